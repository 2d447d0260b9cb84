"""Peer-to-peer cluster layer: hash ring, peer protocol and client/server, membership
(static list or etcd) and the ClusterNode that ties them to the daemon (docs/cluster.md)."""
