"""The identity services (API keys, sessions, CSRF, password policy, OIDC, SAML), built from
the `security:` config over the security engine's store and audit log.

Config -> library settings here; the libraries in security/ know nothing of the config.
One background task writes session idle timers and API-key last-used times behind,
and runs the session cleanup every `session_config.cleanup_interval`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter import tracing
from exporter.config import Config, parse_duration, read_secret
from security.apikeys import ApiKeys, ApiKeySettings
from security.audit import AuditLog
from security.csrf import CsrfTokens, load_or_create_key
from security.federation.oidc import OidcSettings, OidcValidator
from security.identity import IdentityStats
from security.passwords import PasswordPolicy, PasswordSettings
from security.sessions import Sessions, SessionSettings
from security.store import Store, is_outage

if TYPE_CHECKING:  # pysaml2 and xmlschema (about 17 MB resident) only when SAML is on
    from security.federation.saml import SamlServiceProvider, SamlSettings

log = logging.getLogger(__name__)
FLUSH_INTERVAL = 1.0


def apikey_settings(security: dict[str, Any]) -> ApiKeySettings:
    keys = security["api_keys"]
    pepper = read_secret(keys, "pepper")
    return ApiKeySettings(
        default_lifetime=parse_duration(keys["default_lifetime"]),
        max_lifetime=parse_duration(keys["max_lifetime"]),
        rate_limit_per_minute=keys["rate_limit_per_minute"],
        rate_limit_burst=keys["rate_limit_burst"],
        last_used_write_interval=parse_duration(keys["last_used_write_interval"]),
        keep_after_expiry=parse_duration(keys["keep_after_expiry"]),
        pepper=pepper.encode("utf-8") if pepper else None)


def session_settings(security: dict[str, Any]) -> SessionSettings:
    s = security["session_config"]
    return SessionSettings(
        timeout=parse_duration(s["timeout"]),
        absolute_timeout=parse_duration(s["absolute_timeout"]),
        cleanup_interval=parse_duration(s["cleanup_interval"]),
        max_sessions_per_user=s["max_sessions_per_user"],
        secure_cookies=s["secure_cookies"],
        cookie_same_site=s["cookie_same_site"].capitalize(),
        cookie_name=s["cookie_name"])


def password_settings(security: dict[str, Any]) -> PasswordSettings:
    p = security["password_policy"]
    return PasswordSettings(
        min_length=p["min_length"], max_length=p["max_length"],
        require_uppercase=p["require_uppercase"], require_lowercase=p["require_lowercase"],
        require_digit=p["require_digit"], require_special=p["require_special"],
        min_score=p["min_score"], builtin_blocklist=p["builtin_blocklist"],
        blocklist_file=p["blocklist_file"], context_words=tuple(p["context_words"]),
        history_size=p["history_size"], argon2_time_cost=p["argon2"]["time_cost"],
        argon2_memory_cost_kib=p["argon2"]["memory_cost_kib"],
        argon2_parallelism=p["argon2"]["parallelism"])


def oidc_settings(security: dict[str, Any]) -> OidcSettings:
    o = security["oidc"]
    return OidcSettings(
        issuer=o["issuer"], audience=tuple(o["audience"]), algorithms=tuple(o["algorithms"]),
        discovery_url=o["discovery_url"], jwks_uri=o["jwks_uri"],
        jwks_cache_ttl=parse_duration(o["jwks_cache_ttl"]),
        jwks_min_refresh_interval=parse_duration(o["jwks_min_refresh_interval"]),
        leeway=parse_duration(o["leeway"]), required_claims=tuple(o["required_claims"]),
        http_timeout=parse_duration(o["http_timeout"]),
        introspection_endpoint=o["introspection_endpoint"], client_id=o["client_id"],
        client_secret=read_secret(o, "client_secret"))


def saml_settings(security: dict[str, Any]) -> SamlSettings:
    from security.federation.saml import SamlSettings

    s = security["saml"]
    return SamlSettings(
        entity_id=s["entity_id"], acs_url=s["acs_url"],
        idp_metadata_file=s["idp_metadata_file"], sp_key_file=s["sp_key_file"],
        sp_cert_file=s["sp_cert_file"], want_assertions_signed=s["want_assertions_signed"],
        want_response_signed=s["want_response_signed"],
        request_lifetime=parse_duration(s["request_lifetime"]),
        accepted_time_diff=parse_duration(s["accepted_time_diff"]),
        allow_unsolicited=s["allow_unsolicited"], xmlsec_binary=s["xmlsec_binary"])


def csrf_key(security: dict[str, Any], state_dir: Path) -> bytes:
    key = read_secret(security, "csrf_key")
    return key.encode("utf-8") if key else load_or_create_key(state_dir / "csrf.key")


class IdentityServices:
    def __init__(self, config: Config, state_dir: Path, store: Store, audit: AuditLog | None):
        security = config["security"]
        self.store = store
        self.audit = audit
        self.state_dir = state_dir
        self.stats = IdentityStats()
        self.apikeys = ApiKeys(store, apikey_settings(security), audit, self.stats)
        self.sessions = Sessions(store, session_settings(security), audit, self.stats)
        self.csrf = CsrfTokens(csrf_key(security, state_dir),
                               parse_duration(security["csrf_token_lifetime"]),
                               stats=self.stats, audit=audit)
        self.passwords = PasswordPolicy(password_settings(security), store, audit, self.stats)
        self.oidc: OidcValidator | None = None
        self.saml: SamlServiceProvider | None = None
        self._federation(security)
        self._task: asyncio.Task[None] | None = None

    def _federation(self, security: dict[str, Any]) -> None:
        """(Re)builds the OIDC validator and the SAML SP when their sections change."""
        oidc = oidc_settings(security) if security["oidc"]["enabled"] else None
        if self.oidc is not None and (oidc is None or oidc != self.oidc.settings):
            old, self.oidc = self.oidc, None
            with contextlib.suppress(RuntimeError):  # no loop yet: nothing was fetched
                asyncio.get_running_loop().create_task(old.close())
        if oidc is not None and self.oidc is None:
            self.oidc = OidcValidator(oidc, self.stats, self.audit)
        saml = saml_settings(security) if security["saml"]["enabled"] else None
        if saml is None:
            self.saml = None
        elif self.saml is None or saml != self.saml.settings:
            from security.federation.saml import SamlServiceProvider

            self.saml = SamlServiceProvider(saml, self.store, self.stats, self.audit)

    def configure(self, config: Config) -> None:
        """Applies a reloaded config (the store and the state dir stay)."""
        security = config["security"]
        self.apikeys.settings = apikey_settings(security)
        self.sessions.settings = session_settings(security)
        self.csrf = CsrfTokens(csrf_key(security, self.state_dir),
                               parse_duration(security["csrf_token_lifetime"]),
                               stats=self.stats, audit=self.audit)
        self.passwords = PasswordPolicy(password_settings(security), self.store, self.audit,
                                        self.stats)
        self._federation(security)

    async def start(self) -> None:
        """After the store is open: counts what is active, then starts the writer task
        (a shared store that is away at start is counted by the task's next cleanup)."""
        try:
            await self._cleanup()
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.warning("identity cleanup at start: the store is unavailable",
                        extra={"error": str(exc)})
        self._task = tracing.detached_task(self._run(), "identity")

    async def stop(self) -> None:
        """Before the store closes: stops the task and writes what is pending."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.sessions.flush()
            await self.apikeys.flush()
        if self.oidc is not None:
            await self.oidc.close()

    async def _cleanup(self) -> None:
        await self.sessions.cleanup()
        await self.apikeys.list()  # recounts the active keys

    async def _run(self) -> None:
        last_keys = last_cleanup = time.monotonic()
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            now = time.monotonic()
            try:
                await self.sessions.flush()
                if now - last_keys >= self.apikeys.settings.last_used_write_interval:
                    last_keys = now
                    await self.apikeys.flush()
                if now - last_cleanup >= self.sessions.settings.cleanup_interval:
                    last_cleanup = now
                    await self._cleanup()
            except Exception as exc:
                if is_outage(exc):  # one line per round, not a traceback, while it lasts
                    log.warning("identity maintenance: the store is unavailable; will retry",
                                extra={"error": str(exc)})
                else:
                    log.exception("identity maintenance failed; will retry")
