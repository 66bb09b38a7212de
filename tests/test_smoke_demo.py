import subprocess
import sys


def test_demo_once_prints_devices_and_allocation() -> None:
    out = subprocess.run([sys.executable, "-m", "agent", "demo", "--once"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "0002:01:00.2   Healthy" in out
    assert "allocatable: 4 of 4" in out
    assert "PCIDEVICE_NVIDIA_COM_CX7_QSFP=0002:01:00.2" in out
    assert '"rdma-device":"mlx5_4"' in out
