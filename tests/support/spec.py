"""The configuration example of the specification (SPEC 3), as written there: it must load (and,
with real files and reachable addresses, run) exactly so."""

SPEC_EXAMPLE = """\
workers = 2                        # default: CPU count

[upstreams.cobrowse]
servers = ["10.0.0.5:8080", "10.0.0.6:8080"]

[listeners.sdk]                    # public: SDK devices
bind = "0.0.0.0:8443"
policy = "cobrowse-sdk"            # preset policies: cobrowse-sdk, cobrowse-agent
upstream = "cobrowse"
tls = { cert = "/etc/fastproxy/tls.crt", key = "/etc/fastproxy/tls.key" }

[listeners.agent]                  # internal: agents
bind = "10.1.0.2:8080"
policy = "cobrowse-agent"
upstream = "cobrowse"

[admin]
bind = "127.0.0.1:9901"

[presets.cobrowse]                 # toggles of section 2
pin_sdk = true
"""
