"""The built-in storage backends, each registered as an ``optin_service.backends`` entry point."""
