"""Trust between nodes and callers: the cluster CA and node certificates, mutual TLS, role checks on every
RPC, certificate renewal, revocation and CA rotation."""
