"""Log linking: every finding carries the log records of its trace."""

from traceguard.link.log_index import LogIndex, link_logs, select_logs

__all__ = ["LogIndex", "link_logs", "select_logs"]
