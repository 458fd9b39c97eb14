"""Policy against read-back: does the guest's receive-path state match what was asked?

The read-back itself (the guest script and its parser) is a format of its own,
in testbed.formats.readback; the wanted state is a `ResolvedPolicy`. Kept apart
from both so that neither the format knows about policies nor the policy model
about guest output.
"""

from __future__ import annotations

from testbed.experiment.policies import ResolvedPolicy
from testbed.formats.readback import ABSENT, Readback, cpu_mask, fmt_cpulist


def diff_readback(resolved: ResolvedPolicy, readback: Readback, *,
                  gro: bool | None = None) -> list[str]:
    """Differences between what `resolved` asked for and what the guest reports.

    Empty when they match. Each entry names the knob, what was wanted and what
    the guest has, so a failed cell says exactly what went wrong.
    """
    out: list[str] = []
    want_aff = fmt_cpulist(resolved.irq_cpus)
    if not readback.irq_affinity:
        out.append("irq affinity: no NIC IRQ was read back (did find_nic_irqs find the NIC?)")
    for irq, got in sorted(readback.irq_affinity.items()):
        if got is None:
            out.append(f"irq {irq} smp_affinity_list: wanted {want_aff}, got <unreadable>")
        elif got != resolved.irq_cpus:
            out.append(f"irq {irq} smp_affinity_list: wanted {want_aff}, got {fmt_cpulist(got)}")
    if not readback.rps_cpus:
        out.append("rps_cpus: no rx queue was read back (wrong interface name?)")
    want_mask = resolved.rps_mask
    for q, got_cpus in sorted(readback.rps_cpus.items()):
        if got_cpus is None or got_cpus != resolved.rps_cpus:
            shown = "<unreadable>" if got_cpus is None else cpu_mask(got_cpus)
            out.append(f"{q} rps_cpus: wanted {want_mask}, got {shown}")
    for q, got_cnt in sorted(readback.rps_flow_cnt.items()):
        if got_cnt != resolved.rps_flow_cnt:
            shown = "<unreadable>" if got_cnt is None else str(got_cnt)
            out.append(f"{q} rps_flow_cnt: wanted {resolved.rps_flow_cnt}, got {shown}")
    wanted = {"net.core.rps_sock_flow_entries": str(resolved.rps_sock_flow_entries),
              **resolved.sysctls}
    for k, v in wanted.items():
        got_v = readback.sysctls.get(k, "<not read back>")
        if got_v is None:
            out.append(f"sysctl {k}: wanted {v}, got {ABSENT} (this kernel does not have it)")
        elif " ".join(str(got_v).split()) != " ".join(v.split()):
            out.append(f"sysctl {k}: wanted {v}, got {got_v}")
    for k, v in resolved.sysctls_if_present.items():
        got_v = readback.sysctls.get(k, "<not read back>")
        if got_v is not None and " ".join(str(got_v).split()) != " ".join(v.split()):
            out.append(f"sysctl {k}: wanted {v}, got {got_v}")
    if resolved.reader_cpu is not None and readback.reader_affinity:
        for pid, cpus in sorted(readback.reader_affinity.items()):
            if pid == -1 or cpus is None:
                out.append(f"reader affinity: wanted {resolved.reader_cpu}, got no netserver "
                           "data process")
            elif cpus != (resolved.reader_cpu,):
                out.append(f"reader affinity (netserver pid {pid}): wanted "
                           f"{resolved.reader_cpu}, got {fmt_cpulist(cpus)}")
    if gro is not None:
        want = "on" if gro else "off"
        got_gro = readback.offloads.get("generic-receive-offload", "<not read back>")
        if got_gro.split(" ")[0] != want:
            out.append(f"generic-receive-offload: wanted {want}, got {got_gro}")
    return out
