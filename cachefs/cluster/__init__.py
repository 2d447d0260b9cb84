"""Peer-to-peer cluster layer: hash ring, peer protocol, peer client/server."""
