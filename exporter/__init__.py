"""a3mailer-exporter: monitoring, health and security engines published as Prometheus metrics."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("a3mailer-exporter")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"
