# wakeprobe.awk: summarise a tracefs `trace` of sched_waking/sched_switch events
# for one task (-v pid=P), its IRQ CPU (-v k=K) and the sysctl value (-v wake=W).
# sched_waking is traced in the waker's context (its CPU column is the waker's CPU,
# and the flags column's 3rd character is 's' in softirq: the case rx_wake_local
# changes); sched_wakeup is not used because a remote wake-up is completed by an IPI
# on the target CPU. For every wake-up followed by a switch-in, count the CPU the
# task was switched in on: where it really ran. POSIX awk (mawk, busybox).
# "   task-PID   [CPU] FLAGS   TIME: event: ..." -> the CPU; FLAGS follow it
function cpu_of() { match($0, /\[[0-9]+\]/); return substr($0, RSTART + 1, RLENGTH - 2) + 0 }
function flags_of() { match($0, /\[[0-9]+\] /); return substr($0, RSTART + RLENGTH, 5) }
/LOST [0-9]+ EVENTS/ { lost++ }
/ sched_waking: / && $0 ~ (" pid=" pid " ") {
	pending = 1; soft = (substr(flags_of(), 3, 1) == "s")
	wakeups++; if (soft) softirq_wakeups++
	if (soft && cpu_of() == k) softirq_wakers_on_k++
	next
}
/ sched_switch: / && $0 ~ ("next_pid=" pid " ") {
	if (!pending) next
	pending = 0; c = cpu_of(); ran[c]++; placed++
	if (soft) softirq_placed++
	if (c == k) { on_k++; if (soft) softirq_on_k++ }
}
END {
	printf "WAKEPROBE k=%d wake=%s wakeups=%d softirq_wakeups=%d softirq_wakers_on_k=%d",
		k, wake, wakeups, softirq_wakeups, softirq_wakers_on_k
	printf " placed=%d on_k=%d softirq_placed=%d softirq_on_k=%d lost=%d",
		placed, on_k, softirq_placed, softirq_on_k, lost
	for (c in ran) printf " ran_cpu%d=%d", c, ran[c]
	printf "\n"
}
