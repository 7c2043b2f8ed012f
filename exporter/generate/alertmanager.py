"""The Alertmanager example: routes by severity, inhibitions, webhook and e-mail receivers.

Critical alerts page (webhook and mail, repeated hourly), warnings go to the same
receivers at the configured pace, info alerts only to the webhook. A critical alert
inhibits the warning of the same alert on the same instance (the two levels of
A3MailerTlsCertificateExpiring), and A3MailerInfoInhibitor (kube-prometheus's
InfoInhibitor) holds info alerts back while their instance has nothing worse; it
is routed to the null receiver.
"""

from __future__ import annotations

from typing import Any

from exporter.config import Config
from exporter.generate.alerts import INFO_INHIBITOR
from exporter.generate.yaml_dump import dump_yaml

HEADER = (
    "# Alertmanager example for the a3mailer-exporter alert rules.\n"
    "# GENERATED from the config (alerting.alertmanager) by `a3mailer-exporter generate`:\n"
    "# do not edit; check it with `amtool check-config`.\n"
)
GROUP_BY = ["alertname", "cluster", "namespace", "instance"]
INSTANCE = ["cluster", "namespace", "instance"]


def config(cfg: Config) -> dict[str, Any]:
    am = cfg["alerting"]["alertmanager"]
    webhook = [{"url": am["webhook_url"], "send_resolved": True}]
    email = [{"to": am["email_to"], "send_resolved": True}]
    return {
        "global": {"resolve_timeout": "5m", "smtp_smarthost": am["smarthost"],
                   "smtp_from": am["email_from"], "smtp_require_tls": True},
        "route": {
            "receiver": "default",
            "group_by": GROUP_BY,
            "group_wait": am["group_wait"],
            "group_interval": am["group_interval"],
            "repeat_interval": am["repeat_interval"],
            "routes": [
                {"receiver": "null", "matchers": [f'alertname="{INFO_INHIBITOR.name}"']},
                {"receiver": "critical", "matchers": ['severity="critical"'],
                 "repeat_interval": "1h"},
                {"receiver": "warning", "matchers": ['severity="warning"']},
                {"receiver": "info", "matchers": ['severity="info"']},
            ],
        },
        "inhibit_rules": [
            {"source_matchers": ['severity="critical"'], "target_matchers": ['severity="warning"'],
             "equal": GROUP_BY},
            {"source_matchers": [f'alertname="{INFO_INHIBITOR.name}"'],
             "target_matchers": ['severity="info"'], "equal": INSTANCE},
        ],
        "receivers": [
            {"name": "null"},
            {"name": "default", "webhook_configs": webhook},
            {"name": "critical", "webhook_configs": webhook, "email_configs": email},
            {"name": "warning", "webhook_configs": webhook, "email_configs": email},
            {"name": "info", "webhook_configs": webhook},
        ],
    }


def alertmanager_yml(cfg: Config) -> str:
    return HEADER + dump_yaml(config(cfg))
