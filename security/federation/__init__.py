"""Federated identity: OpenID Connect / OAuth 2.0 tokens and SAML 2.0 assertions."""
