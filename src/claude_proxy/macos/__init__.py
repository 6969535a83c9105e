"""The launchd agent that keeps the proxy running on macOS, and the plist template it is rendered
from (a link to launchd/local.claude-proxy.plist, so that the wheel carries its bytes).
"""
