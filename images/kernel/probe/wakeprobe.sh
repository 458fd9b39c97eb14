#!/bin/sh
# wakeprobe.sh K WAKE PORT [IFACE [DUMP]]: the guest side of the wake-on-RX-CPU test.
# DUMP > 0 also prints the first DUMP trace lines (prefixed TRACE) for debugging.
#
# Pins IFACE's interrupt(s) to CPU K, sets net.core.rx_wake_local=WAKE (when the
# kernel has it), runs rxreader on PORT with no affinity of its own, and traces
# the reader's sched_waking/sched_switch events (tracefs) until the sender closes.
# Prints one summary line (see wakeprobe.awk), measured from the trace (the CPU the
# reader was switched in on after each wake-up), not from what was asked:
#   WAKEPROBE k=K wake=WAKE wakeups=N softirq_wakeups=.. softirq_wakers_on_k=..
#             placed=P on_k=A softirq_placed=S softirq_on_k=B lost=L ran_cpuX=..
# wakeups: the reader's sched_waking events; softirq_*: those whose waker ran in
# softirq context (the case the patch changes), *_wakers_on_k: ... on CPU K (shows the
# IRQ pinning worked); placed: wake-ups followed by a switch-in (waking a task that
# has not yet left its CPU places nothing); on_k: ... switched in on CPU K.
# Needs busybox (or coreutils+gawk) and tracefs. Exit status 0 unless setup failed.
set -u
K=$1 WAKE=$2 PORT=$3 IFACE=${4:-eth0} DUMP=${5:-0}
DIR=$(dirname "$0")
T=/sys/kernel/tracing
[ -d $T/events ] || mount -t tracefs nodev $T 2>/dev/null || { echo "WAKEPROBE-ERROR no tracefs"; exit 1; }
# e1000 names its (INTx) IRQ after the interface; virtio-net's MSI-X vectors are
# listed under the PCI device (the virtio device's parent).
IRQS=$(awk -v i="$IFACE" '$NF == i || $NF ~ "^"i"-" { sub(":", "", $1); print $1 }' /proc/interrupts)
for d in /sys/class/net/$IFACE/device /sys/class/net/$IFACE/device/..; do
	[ -z "$IRQS" ] && [ -d $d/msi_irqs ] && IRQS=$(ls $d/msi_irqs)
done
[ -n "$IRQS" ] || { echo "WAKEPROBE-ERROR no IRQ for $IFACE"; exit 1; }
for irq in $IRQS; do echo "$K" > /proc/irq/$irq/smp_affinity_list || exit 1; done
if [ -e /proc/sys/net/core/rx_wake_local ]; then
	echo "$WAKE" > /proc/sys/net/core/rx_wake_local || exit 1
elif [ "$WAKE" != 0 ]; then
	echo "WAKEPROBE-ERROR kernel has no net.core.rx_wake_local"; exit 1
fi
"$DIR/rxreader" "$PORT" > /tmp/rxreader.out &
PID=$!
echo 0 > $T/tracing_on
echo > $T/trace
echo 8192 > $T/buffer_size_kb
echo "$PID" > $T/set_event_pid
echo 1 > $T/events/sched/sched_waking/enable
echo 1 > $T/events/sched/sched_switch/enable
echo 1 > $T/tracing_on
echo "WAKEPROBE-LISTENING pid=$PID irqs=$(echo $IRQS | tr ' ' ,)"
wait $PID
echo 0 > $T/tracing_on
echo 0 > $T/events/sched/sched_waking/enable
echo 0 > $T/events/sched/sched_switch/enable
echo > $T/set_event_pid
cat /tmp/rxreader.out
awk -v pid="$PID" -v k="$K" -v wake="$WAKE" -f "$DIR/wakeprobe.awk" $T/trace
[ "$DUMP" -gt 0 ] && grep -v '^#' $T/trace | head -n "$DUMP" | sed 's/^/TRACE /'
echo > $T/trace
