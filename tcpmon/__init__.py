"""tcpmon: TCP connect attempts per process, counted in the kernel, served to Prometheus."""
__version__ = "0.1.0"
