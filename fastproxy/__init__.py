"""fastproxy: an L7 firewall and reverse proxy in front of a co-browsing platform.

Importing this package has no side effects; the command line lives in ``fastproxy.cli``.
"""

__version__ = "0.1.0"
