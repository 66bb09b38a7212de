"""sriov-rdma-agent: SR-IOV VFs with RDMA as kubelet device-plugin resources."""

__version__ = "0.1.0"
