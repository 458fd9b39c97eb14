"""QEMU command lines for every NIC model, accelerator and data-plane attachment."""

from pathlib import Path

import pytest

from testbed.build.qemu_backport import QemuInstall
from testbed.vm.process import ready_line
from testbed.vm.qemu import (
    GuestSpec,
    PluginSpec,
    SocketAttachment,
    TapAttachment,
    kernel_append,
    nic_device_arg,
    qemu_argv,
)


def spec(**kw) -> GuestSpec:
    base = dict(name="receiver", kernel=Path("/k/bzImage"), initrd=Path("/i/initrd.cpio"),
                cpus=2, memory_mb=1024, accel="tcg", ssh_port=2222, workdir=Path("/w"),
                ssh_pubkey_b64="AAAAkey", index=1)
    base.update(kw)
    return GuestSpec(**base)


def arg_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_tcg_is_multithreaded_with_max_cpu():
    argv = qemu_argv(spec())
    assert arg_after(argv, "-accel") == ["tcg,thread=multi"]
    assert arg_after(argv, "-cpu") == ["max"]
    assert arg_after(argv, "-smp") == ["2"]
    assert arg_after(argv, "-m") == ["1024"]


def test_icount_makes_tcg_single_threaded_with_deterministic_guest_time():
    argv = qemu_argv(spec(icount="shift=auto"))
    assert arg_after(argv, "-accel") == ["tcg,thread=single"]
    assert arg_after(argv, "-icount") == ["shift=auto"]
    # without a fixed lpj the second vCPU's bring-up stalls under -icount
    assert "lpj=3999972" in arg_after(argv, "-append")[0]
    assert "-icount" not in qemu_argv(spec())
    assert "lpj=" not in arg_after(qemu_argv(spec()), "-append")[0]


def test_kvm_uses_host_cpu_with_pmu():
    argv = qemu_argv(spec(accel="kvm"))
    assert arg_after(argv, "-accel") == ["kvm"]
    assert arg_after(argv, "-cpu") == ["host,pmu=on"]


def test_single_threaded_tcg_when_asked():
    assert arg_after(qemu_argv(spec(tcg_threads="single")), "-accel") == ["tcg,thread=single"]


def test_management_nic_forwards_ssh_on_loopback_only_and_is_restricted():
    argv = qemu_argv(spec(ssh_port=40001))
    mgmt = [a for a in arg_after(argv, "-netdev") if a.startswith("user,")]
    assert len(mgmt) == 1
    assert "hostfwd=tcp:127.0.0.1:40001-:22" in mgmt[0]
    assert "restrict=on" in mgmt[0]


def test_no_data_nic_without_attachment():
    argv = qemu_argv(spec(nic="e1000"))
    assert not any(a.startswith(("e1000", "tap,", "socket,")) for a in argv)


@pytest.mark.parametrize(("model", "device"), [
    ("e1000", "e1000,"), ("virtio", "virtio-net-pci,"), ("virtio-nocsum", "virtio-net-pci,"),
    ("virtio-notso", "virtio-net-pci,")])
def test_data_nic_models(model, device):
    argv = qemu_argv(spec(nic=model, data=TapAttachment("nbt1r"), data_ip="198.18.0.1/24"))
    devices = arg_after(argv, "-device")
    data = [d for d in devices if "netdev=data" in d]
    assert len(data) == 1 and data[0].startswith(device)
    assert "mac=52:54:00:12:00:01" in data[0]
    if model == "virtio-nocsum":
        for prop in ("csum=off", "guest_csum=off", "guest_tso4=off", "host_tso4=off"):
            assert prop in data[0].split(",")
    elif model == "virtio-notso":  # checksum offload kept, no TSO/GSO frames into the guest
        props = data[0].split(",")
        assert "guest_csum=on" in props and "csum=off" not in props
        for prop in ("guest_tso4=off", "guest_tso6=off", "guest_ufo=off"):
            assert prop in props
    else:
        assert "csum=off" not in data[0]


def test_tap_attachment_has_vnet_hdr():
    argv = qemu_argv(spec(nic="virtio", data=TapAttachment("nbtabcr"), data_ip="198.18.0.1/24"))
    assert "tap,id=data,ifname=nbtabcr,script=no,downscript=no,vnet_hdr=on" in argv


@pytest.mark.parametrize(("listen", "word"), [(True, "listen"), (False, "connect")])
def test_socket_attachment_on_loopback(listen, word):
    argv = qemu_argv(spec(nic="e1000", data=SocketAttachment(5555, listen), data_ip="x/24"))
    assert f"socket,id=data,{word}=127.0.0.1:5555" in argv


def test_kernel_command_line_carries_init_settings():
    line = kernel_append(spec(nic="e1000", data=TapAttachment("t"), data_ip="198.18.0.1/24"))
    for part in ("console=ttyS0", "panic=-1", "netbed.name=receiver", "netbed.ssh_key=AAAAkey",
                 "netbed.data_ip=198.18.0.1/24", "netbed.data_mac=52:54:00:12:00:01",
                 "netbed.mgmt_mac=52:54:00:ff:00:01"):
        assert part in line.split()


def test_console_and_qmp_paths_live_in_workdir():
    argv = qemu_argv(spec())
    assert "file,id=console,path=/w/console-receiver.log" in argv
    assert "unix:/w/qmp-receiver.sock,server=on,wait=off" in argv


def test_plugins_render_with_arguments():
    p = PluginSpec(Path("/p/lib.so"), (("out", "/r/c.csv"), ("l1d", "32768")))
    argv = qemu_argv(spec(plugins=(p,)))
    assert arg_after(argv, "-plugin") == ["file=/p/lib.so,out=/r/c.csv,l1d=32768"]


def test_unknown_nic_model_is_rejected():
    with pytest.raises(ValueError, match="allowed: e1000, virtio, virtio-nocsum, virtio-notso"):
        nic_device_arg("rtl8139", "data", "52:54:00:00:00:00")  # type: ignore[arg-type]


def test_ready_line_found_among_kernel_noise():
    text = "[    1.0] random noise\nnetbed-init: x\nNETBED-READY name=rx mgmt=eth0 data=eth1\n"
    assert ready_line(text) == "NETBED-READY name=rx mgmt=eth0 data=eth1"


@pytest.mark.parametrize("text", ["", "booting...\n", "echo NETBED-READY\n", "NETBED-READYX\n"])
def test_ready_line_absent(text):
    assert ready_line(text) is None


BACKPORT = QemuInstall(binary="/q/usr/bin/qemu-system-x86_64", version="10.0.2",
                       kind="backport")
SYSTEM = QemuInstall(binary="qemu-system-x86_64", kind="system")
RAM_PLUGIN = PluginSpec(Path("/p/lib.so"), (("out", "/r/c.csv"),), guest_ram_arg="guest_ram")


def test_backport_puts_guest_ram_in_a_memfd_for_a_plugin_that_maps_it():
    argv = qemu_argv(spec(plugins=(RAM_PLUGIN,)), BACKPORT)
    assert arg_after(argv, "-m") == ["1024"]  # kept: QEMU checks it against the backend
    assert arg_after(argv, "-object") == [
        "memory-backend-memfd,id=netbed-ram,size=1024M,share=on"]
    assert arg_after(argv, "-machine") == ["q35", "memory-backend=netbed-ram"]
    assert arg_after(argv, "-plugin") == ["file=/p/lib.so,out=/r/c.csv,guest_ram=1024M"]


@pytest.mark.parametrize("qemu", [SYSTEM, "qemu-system-x86_64"])
def test_system_qemu_keeps_anonymous_ram_and_plugin_args(qemu):
    argv = qemu_argv(spec(plugins=(RAM_PLUGIN,)), qemu)
    assert "-object" not in argv
    assert arg_after(argv, "-machine") == ["q35"]
    assert arg_after(argv, "-plugin") == ["file=/p/lib.so,out=/r/c.csv"]


@pytest.mark.parametrize("plugins", [(), (PluginSpec(Path("/p/other.so")),)])
def test_backport_without_a_ram_reading_plugin_keeps_anonymous_ram(plugins):
    argv = qemu_argv(spec(plugins=plugins), BACKPORT)
    assert "-object" not in argv
    assert arg_after(argv, "-machine") == ["q35"]
