"""fastproxy: an L7 firewall and reverse proxy in front of a co-browsing platform.

Importing this package chooses the build its modules load from (``accel.select``: compiled
with mypyc when installed that way and current, else plain Python) and has no other side
effects; the command line lives in ``fastproxy.cli``.
"""

from fastproxy import accel as _accel

__version__ = "0.1.0"
#: which build runs (``accel.Build``): ``fastproxy version`` and ``fastproxy_build_info``
BUILD = _accel.select()
