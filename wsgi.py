"""The WSGI entry point: ``gunicorn wsgi:app``."""

from optin_service import create_app

app = create_app()
