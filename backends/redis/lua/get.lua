-- A read. KEYS: current, history.
-- Returns {state value, the current event's history member}, or nil.
local current, us, declined = state(KEYS[1])
if not current then return false end
return {current, event_of(KEYS[2], us, declined)}
