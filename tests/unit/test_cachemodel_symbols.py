"""Address -> symbol resolution (testbed/formats/symbols.py), pure."""

from __future__ import annotations

import pytest

from testbed.errors import NetbedError
from testbed.formats import symbols as s

KALLSYMS = """\
ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff81001000 t copy_user_generic_string
ffffffff81001000 T copy_user_alias
ffffffff81001100 D some_data
ffffffff81001200 T tcp_recvmsg
ffffffffc0010000 t e1000_clean_rx_irq\t[e1000]
ffffffffc0010400 t e1000_alloc_rx_buffers\t[e1000]
"""

NM = """\
0000000010001000 0000000000000040 T main
0000000010001040 0000000000000020 t ping_side
0000000010001060 0000000000000020 t pong_side
0000000010002000 0000000000000008 D a_variable
0000000010003000 w weak_undefined_has_no_size
"""


def test_kallsyms_text_symbols_cover_up_to_the_next_one():
    t = s.parse_kallsyms(KALLSYMS)
    got = s.attribute([0xFFFFFFFF81001000, 0xFFFFFFFF810011FF, 0xFFFFFFFF81001234,
                       0xFFFFFFFFC0010010, 0xFFFFFFFFC0010400], t, None)
    # aliases at one address: one name (the first by name); data symbols are skipped
    assert got == ["copy_user_alias", "copy_user_alias", "tcp_recvmsg",
                   "e1000_clean_rx_irq [e1000]", "e1000_alloc_rx_buffers [e1000]"]


def test_the_last_symbol_gets_a_bounded_guess_and_other_kernel_addresses_say_unknown():
    t = s.parse_kallsyms(KALLSYMS)
    far = 0xFFFFFFFFC0010400 + s.MAX_GUESSED_SIZE
    assert s.attribute([far - 1, far, 0xFFFFFFFF80000000], t, None) == [
        "e1000_alloc_rx_buffers [e1000]", s.KERNEL_UNKNOWN, s.KERNEL_UNKNOWN]


def test_hidden_kallsyms_addresses_are_refused_with_the_fix():
    with pytest.raises(NetbedError, match="kptr_restrict"):
        s.parse_kallsyms("0000000000000000 T _text\n0000000000000000 t foo\n")


def test_a_garbled_line_names_its_source_and_line():
    with pytest.raises(NetbedError, match=r"guest:2: not a kallsyms line"):
        s.parse_kallsyms("ffffffff81000000 T _text\nnot a symbol line at all\n", "guest")


def test_nm_symbols_have_exact_sizes_and_carry_the_tool_name():
    t = s.parse_nm(NM, "nbbench_attrib")
    got = s.attribute([0x10001040, 0x1000105F, 0x10001060, 0x10001080, 0x10002000], None, t)
    assert got[:3] == ["nbbench_attrib:ping_side", "nbbench_attrib:ping_side",
                       "nbbench_attrib:pong_side"]
    assert got[3:] == ["[user:low (static exe)]"] * 2  # past pong_side; data is not code


def test_user_addresses_no_table_covers_are_labelled_by_range():
    assert s.attribute([0x555555554123, 0x7F0012345678, 0x600000000000], None, None) == [
        "[user:pie-exe]", "[user:mmap/libs/stack]", s.USER_OTHER]


def test_tools_at_the_same_addresses_are_ambiguous_and_left_unresolved():
    a = s.parse_nm("0000000000401000 0000000000000100 T main\n", "a")
    b = s.parse_nm("0000000000401080 0000000000000100 T main\n", "b")
    c = s.parse_nm("0000000010001000 0000000000000100 T main\n", "c")
    t = s.merge([a, b, c])
    assert s.attribute([0x401000, 0x401100, 0x10001000], None, t) == [
        "[user:low (static exe)]", "[user:low (static exe)]", "c:main"]


def test_stored_tables_round_trip():
    t = s.parse_nm(NM, "tool")
    back = s.parse_table(s.format_ranges(t), "x")
    assert list(back.names) == list(t.names) and list(back.ends) == list(t.ends)
    name, blob = s.compress_table(KALLSYMS)
    assert name == s.compress_table(KALLSYMS)[0] and blob == s.compress_table(KALLSYMS)[1]
    k = s.parse_table(s.decompress_table(blob, "x"), "x")
    assert len(k) == len(s.parse_kallsyms(KALLSYMS))
    with pytest.raises(NetbedError, match="not a gzip"):
        s.decompress_table(b"plain", "x")
