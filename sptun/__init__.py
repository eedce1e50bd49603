"""sptun: publish web servers without a public IP through WireGuard tunnel servers."""

__version__ = "0.1.0"
