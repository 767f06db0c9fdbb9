"""xentap: hypervisor-level data services for Xen (dom0 side)."""
