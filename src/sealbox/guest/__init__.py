"""The guest agent (runs inside every sandbox) and the host's client for its channel.

`protocol` is the wire format shared by both sides, `agent` the in-sandbox server (standard
library only), `client` the host side the engine uses.
"""
