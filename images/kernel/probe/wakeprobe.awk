# wakeprobe.awk: summarise a tracefs `trace` of sched_wakeup/sched_switch events
# for one task (-v pid=P), its IRQ CPU (-v k=K) and the sysctl value (-v wake=W).
# For every wake-up followed by a switch-in, count the CPU the task was switched in
# on: where it really ran. The flags column's 3rd character is 's' when the wake-up
# ran in softirq context (the case rx_wake_local changes). POSIX awk (mawk, busybox).
# "   task-PID   [CPU] FLAGS   TIME: event: ..." -> the CPU; FLAGS follow it
function cpu_of() { match($0, /\[[0-9]+\]/); return substr($0, RSTART + 1, RLENGTH - 2) + 0 }
function flags_of() { match($0, /\[[0-9]+\] /); return substr($0, RSTART + RLENGTH, 5) }
/LOST [0-9]+ EVENTS/ { lost++ }
/ sched_wakeup: / && $0 ~ (" pid=" pid " ") {
	pending = 1; soft = (substr(flags_of(), 3, 1) == "s")
	wakeups++
	next
}
/ sched_switch: / && $0 ~ ("next_pid=" pid " ") {
	if (!pending) next
	pending = 0; c = cpu_of(); ran[c]++; placed++
	if (soft) softirq_placed++
	if (c == k) { on_k++; if (soft) softirq_on_k++ }
}
END {
	printf "WAKEPROBE k=%d wake=%s wakeups=%d placed=%d on_k=%d softirq_placed=%d softirq_on_k=%d lost=%d",
		k, wake, wakeups, placed, on_k, softirq_placed, softirq_on_k, lost
	for (c in ran) printf " ran_cpu%d=%d", c, ran[c]
	printf "\n"
}
