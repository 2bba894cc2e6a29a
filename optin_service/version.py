"""The release number, in this one place: setup.cfg, ``optin --version`` and the
OpenAPI document read it; CHANGELOG.md says what each release changed."""

__version__ = "0.2.0"
