"""What the proxy keeps on disk and where: the CA and the trust bundle, the accounts and their
organizations, the running proxy's state file, private files written safely, the paths of all of
these, and the log files. Commands that need no proxy use these without importing mitmproxy.
"""
