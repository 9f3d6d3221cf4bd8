"""A1111's prompt language, text side: emphasis, BREAK, editing, alternation, AND, <lora:...>.

Expected values are A1111's own (its doctests, wiki examples) or worked out by hand from its
documented rules; the comments say which.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pipelines.core.extra_networks import ExtraNetwork, extract_extra_networks
from pipelines.core.prompt_parser import (
    BREAK,
    is_break,
    parse_attention,
    prompt_schedule,
    split_and,
    text_at_step,
)

B = BREAK

# --------------------------------------------------------------------------------------
# Emphasis
# --------------------------------------------------------------------------------------

ATTENTION_CASES = [
    # A1111's doctests of parse_prompt_attention
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
         ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)],
    ),
    # the brief's examples
    ("a (b:1.5) c", [("a ", 1.0), ("b", 1.5), (" c", 1.0)]),
    ("((a))", [("a", 1.21)]),
    ("[a]", [("a", 1 / 1.1)]),
    ("\\(a\\)", [("(a)", 1.0)]),
    # weights and nesting
    ("[[a]]", [("a", 1 / 1.21)]),
    ("(a, b:0.8)", [("a, b", 0.8)]),
    ("(a: 1.5 )", [("a", 1.5)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:+.5)", [("a", 0.5)]),
    ("(a:2.)", [("a", 2.0)]),
    ("((a:1.2):1.5)", [("a", 1.8)]),  # nested explicit weights multiply
    ("((a:1.2))", [("a", 1.32)]),
    ("[(a:1.5)]", [("a", 1.5 / 1.1)]),
    ("(a [b] c)", [("a ", 1.1), ("b", 1.0), (" c", 1.1)]),
    ("(a (b) c:0.5)", [("a ", 0.5), ("b", 0.55), (" c", 0.5)]),
    ("(a:1.2) (b:1.2)", [("a", 1.2), (" ", 1.0), ("b", 1.2)]),
    ("(a:1.2)(b:1.2)", [("ab", 1.2)]),  # equal neighbours merge
    ("(a)(b:1.1)", [("ab", 1.1)]),
    # round and square brackets are counted separately: ")" closes the "(" through a "["
    ("(a [b) c]", [("a ", 1.1), ("b", 1.0), (" c", 1 / 1.1)]),
    # unclosed: rest of the prompt; round ones first, then square
    ("((a)", [("a", 1.21)]),
    ("a [b (c", [("a ", 1.0), ("b ", 1 / 1.1), ("c", 1.0)]),
    ("(a [b", [("a ", 1.1), ("b", 1.0)]),
    # nothing open: closers, weights and colons are plain text
    ("a) b]", [("a) b]", 1.0)]),
    (":1.5) x", [(":1.5) x", 1.0)]),
    ("a:b", [("a:b", 1.0)]),
    ("(a:b)", [("a:b", 1.1)]),
    ("(a:1e3)", [("a:1e3", 1.1)]),  # not a weight: "e" is outside [.0-9]
    ("(a:1.2.3)", [("a:1.2.3", 1.1)]),  # A1111 raises on float("1.2.3"); we keep it as text
    ("[a:1.5]", [("a:1.5", 1 / 1.1)]),  # ":w" only closes round brackets
    # escapes: \( \) \[ \] \\ are literal; a backslash before anything else disappears
    ("\\[a\\]", [("[a]", 1.0)]),
    ("a\\\\b", [("a\\b", 1.0)]),
    ("a\\b", [("ab", 1.0)]),
    ("a\\", [("a", 1.0)]),
    ("(a\\)", [("a)", 1.1)]),
    ("\\((a)\\)", [("(", 1.0), ("a", 1.1), (")", 1.0)]),
    ("(a\\:1.5)", [("a", 1.5)]),  # "\\:" is no escape: the backslash goes, ":1.5)" is a weight
    # empty
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
    ("[]", [("", 1.0)]),
    # BREAK: upper case, whole word, eats the whitespace around it
    ("a BREAK b", [("a", 1.0), B, ("b", 1.0)]),
    ("a BREAK", [("a", 1.0), B, ("", 1.0)]),
    ("BREAK b", [("", 1.0), B, ("b", 1.0)]),
    ("a,BREAK,b", [("a,", 1.0), B, (",b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), B, ("b", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), B, ("", 1.0), B, ("b", 1.0)]),
    ("a break b", [("a break b", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),
    ("a BREAKS b", [("a BREAKS b", 1.0)]),
    ("a BREAK_b", [("a BREAK_b", 1.0)]),
    ("(a) BREAK (b)", [("a", 1.1), ("", 1.0), B, ("", 1.0), ("b", 1.1)]),
    ("a BREAK:b", [("a", 1.0), B, (":b", 1.0)]),
    # A1111 multiplies the marker too, so inside brackets it is no longer a break
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
]


@pytest.mark.parametrize("text,expected", ATTENTION_CASES, ids=[c[0] or "<empty>" for c in ATTENTION_CASES])
def test_parse_attention(text, expected):
    got = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_weights_are_computed_in_a1111_order_bit_for_bit():
    # A1111's doctest prints these exact floats; runs only merge when floats are equal,
    # so the order of multiplications is part of the behaviour
    got = dict(parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") )
    assert got["house"] == 1.5730000000000004
    assert got["sky"] == 1.4641000000000006
    assert parse_attention("((a))") == [("a", 1.1 * 1.1)]
    assert parse_attention("[a]") == [("a", 1 / 1.1)]


def test_break_marker():
    assert BREAK == ("BREAK", -1.0)
    segments = parse_attention("one BREAK two")
    assert [is_break(s) for s in segments] == [False, True, False]
    assert not is_break(("BREAK", 1.0))
    assert not is_break(parse_attention("(BREAK)")[1])


def test_attention_returns_tuples_of_str_and_float():
    for text, weight in parse_attention("a (b) [c] (d:2) BREAK e"):
        assert isinstance(text, str) and isinstance(weight, float)


def test_attention_is_linear_enough_on_hostile_input():
    start = time.monotonic()
    parse_attention("(" * 20000 + "a")
    parse_attention("(a)" * 20000)
    parse_attention("[a:b:" * 5000)
    assert time.monotonic() - start < 10


# --------------------------------------------------------------------------------------
# Prompt editing and alternation
# --------------------------------------------------------------------------------------


def expand(schedule, steps):
    """The text for each schedule step 1..steps (the unmerged form A1111's doctests print)."""
    out = []
    for step in range(1, steps + 1):
        out.append(next(text for end, text in schedule if step <= end))
    return out


def unmerged(a1111_list, steps):
    return expand([tuple(x) for x in a1111_list], steps)


# A1111's doctests for get_learned_conditioning_prompt_schedules at 10 steps (unmerged form).
# Its doctest `a [{b|d{:.5] c` is left out: it is stale, A1111's own parser rejects that prompt
# ("|" outside an alternation) and uses it unchanged -- see test_unparseable_prompts_are_used_as_is.
A1111_DOCTESTS = [
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", [[k, "a" if k % 2 else "(b:1.1)"] for k in range(1, 11)]),
    ("[fe|]male", [[k, "female" if k % 2 else "male"] for k in range(1, 11)]),
    ("[fe|||]male", [[k, "female" if k % 4 == 1 else "male"] for k in range(1, 11)]),
]


@pytest.mark.parametrize("prompt,expected", A1111_DOCTESTS, ids=[c[0] for c in A1111_DOCTESTS])
def test_a1111_doctests(prompt, expected):
    assert expand(prompt_schedule(prompt, 10), 10) == unmerged(expected, 10)


FANTASY = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
           "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]")


SCHEDULE_CASES = [
    # the brief's examples
    ("[cat:dog:10]", 20, [(10, "cat"), (20, "dog")]),
    ("[cat:dog:0.25]", 20, [(5, "cat"), (20, "dog")]),
    ("[a|b]", 4, [(1, "a"), (2, "b"), (3, "a"), (4, "b")]),
    # A1111 wiki, "Prompt editing", 100 steps
    (FANTASY, 100, [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]),
    # add / remove
    ("a [b:5]", 10, [(5, "a "), (10, "a b")]),
    ("a [b::5]", 10, [(5, "a b"), (10, "a ")]),
    ("[:5]", 10, [(10, "")]),
    ("[::5]", 10, [(10, "")]),
    ("[a: :5]", 10, [(5, "a"), (10, " ")]),
    ("[a:b:5 ]", 10, [(5, "a"), (10, "b")]),
    ("[a:b:\t5\n]", 10, [(5, "a"), (10, "b")]),
    ("[5:10]", 20, [(10, ""), (20, "5")]),
    ("[a:5:10]", 20, [(10, "a"), (20, "5")]),
    # when: a decimal point makes it a fraction (A1111 >= 1.6), else a step; int() truncates
    ("[a:b:1]", 10, [(1, "a"), (10, "b")]),
    ("[a:b:1.0]", 10, [(10, "a")]),
    ("[a:b:0]", 10, [(10, "b")]),
    ("[a:b:0.0]", 10, [(10, "b")]),
    ("[a:b:0.05]", 10, [(10, "b")]),  # 0.5 -> step 0: never "a"
    ("[a:b:0.15]", 10, [(1, "a"), (10, "b")]),
    ("[a:b:0.29]", 100, [(28, "a"), (100, "b")]),  # 0.29*100 == 28.999999999999996
    ("[a:b:0.6]", 100, [(60, "a"), (100, "b")]),  # 60.00000000000001
    ("[a:b:0.333]", 20, [(6, "a"), (20, "b")]),
    ("[a:b:25]", 10, [(10, "a")]),  # capped at steps
    ("[a:b:2.5]", 10, [(10, "a")]),  # 25 steps, capped
    ("[a:b:-3]", 10, [(10, "b")]),
    ("[a:b:+3]", 10, [(3, "a"), (10, "b")]),
    ("[a:b:1e1]", 20, [(10, "a"), (20, "b")]),  # no decimal point: a step number
    ("[a:b:5e-1]", 10, [(10, "b")]),  # 0.5 is no decimal point either: step int(0.5) = 0
    ("[a:b:.5e1]", 2, [(2, "a")]),  # decimal point: 5 * steps, capped
    ("[a:b:1e999]", 10, [(10, "a")]),  # A1111 raises on int(inf); we cap
    # emphasis passes through untouched, also around and inside editing
    ("(x:1.2) [y] \\(z\\) [a:b:5]", 10, [(5, "(x:1.2) [y] \\(z\\) a"), (10, "(x:1.2) [y] \\(z\\) b")]),
    ("([a:b:0.5]:1.2)", 10, [(5, "(a:1.2)"), (10, "(b:1.2)")]),
    ("[a:(b:1.5):3]", 10, [(3, "a"), (10, "(b:1.5)")]),
    ("[(a:1.5):[b]:3]", 10, [(3, "(a:1.5)"), (10, "[b]")]),
    ("[[a]:b:3]", 10, [(3, "[a]"), (10, "b")]),
    ("[a:b]", 10, [(10, "[a:b]")]),  # not editing: no number; left for parse_attention
    ("[a:b:c:3]", 10, [(10, "[a:b:c:3]")]),
    ("[a:b:3x]", 10, [(10, "[a:b:3x]")]),
    ("[a:b:1.5.]", 10, [(10, "[a:b:1.5.]")]),
    # nesting
    ("[[a|b]:c:4]", 6, [(1, "a"), (2, "b"), (3, "a"), (4, "b"), (6, "c")]),
    ("[x|[y:z:3]]", 6, [(1, "x"), (2, "y"), (3, "x"), (4, "z"), (5, "x"), (6, "z")]),
    ("[a:[b:c:0.5]:0.2]", 10, [(2, "a"), (5, "b"), (10, "c")]),
    ("[[a:b:8]:c:2]", 10, [(2, "a"), (10, "c")]),
    ("[a|b|c]", 6, [(1, "a"), (2, "b"), (3, "c"), (4, "a"), (5, "b"), (6, "c")]),
    ("[a||b]", 3, [(1, "a"), (2, ""), (3, "b")]),
    ("[|a]", 2, [(1, ""), (2, "a")]),
    ("[a|a]", 4, [(4, "a")]),  # equal texts merge
    ("([a|b])", 2, [(1, "(a)"), (2, "(b)")]),
    ("[a|(b:1.2)|[c]]", 3, [(1, "a"), (2, "(b:1.2)"), (3, "[c]")]),
    # a bracket that starts no construct is a literal at the top level; the rest still parses
    ("x [a:(b:3] [c:4]", 10, [(4, "x [a:(b:3] "), (10, "x [a:(b:3] c")]),
    ("[a [b:3]", 10, [(3, "[a "), (10, "[a b")]),
    ("a] [b:3]", 10, [(3, "a] "), (10, "a] b")]),
    ("(a [b:3]", 10, [(3, "(a "), (10, "(a b")]),
    ("[a:[b:c]:3]", 10, [(10, "[a:[b:c]:3]")]),
    # escapes are kept as written (parse_attention unescapes) and are never syntax
    ("a \\[b:3\\] [c:2]", 10, [(2, "a \\[b:3\\] "), (10, "a \\[b:3\\] c")]),
    ("[a\\|b:c:3]", 10, [(3, "a\\|b"), (10, "c")]),
    ("[a\\:b:3]", 10, [(3, ""), (10, "a\\:b")]),
    # empty
    ("", 10, [(10, "")]),
    ("  ", 10, [(10, "  ")]),
]


@pytest.mark.parametrize("prompt,steps,expected", SCHEDULE_CASES,
                         ids=[f"{c[0][:40]}@{c[1]}" for c in SCHEDULE_CASES])
def test_prompt_schedule(prompt, steps, expected):
    assert prompt_schedule(prompt, steps) == expected


@pytest.mark.parametrize("prompt", [
    "a | b [c:3]",  # "|" outside [ ]
    "(a|b) [c:3]",  # "|" inside ( )
    "[a|b:0.5]",  # an option may not hold a top-level ":"
    "[a|b [c:3]",  # unclosed alternation leaves a top-level "|"
    "a [{b|d{:.5] c",  # A1111's stale doctest: really unparseable
    "[b:2] a\\",  # backslash at the end
    "[b:2] a\\\nc",  # backslash before a newline
])
def test_unparseable_prompts_are_used_as_is(prompt):
    assert prompt_schedule(prompt, 10) == [(10, prompt)]


def test_old_scheduling_option():
    # A1111's "Use old prompt editing timelines": below 1 a fraction, otherwise a step number
    assert prompt_schedule("[a:b:1.0]", 10, use_old_scheduling=True) == [(1, "a"), (10, "b")]
    assert prompt_schedule("[a:b:2.5]", 10, use_old_scheduling=True) == [(2, "a"), (10, "b")]
    assert prompt_schedule("[a:b:0.5]", 10, use_old_scheduling=True) == [(5, "a"), (10, "b")]
    assert prompt_schedule("[a:b:3]", 10, use_old_scheduling=True) == [(3, "a"), (10, "b")]


def test_schedule_entries_change_text_every_time():
    for prompt, steps, _ in SCHEDULE_CASES:
        schedule = prompt_schedule(prompt, steps)
        texts = [t for _, t in schedule]
        assert all(a != b for a, b in zip(texts, texts[1:]))
        ends = [e for e, _ in schedule]
        assert ends == sorted(set(ends)) and ends[-1] == steps


def test_merged_schedule_means_the_same_as_a1111_unmerged():
    schedule = prompt_schedule("[fe|||]male", 10)
    assert schedule == [(1, "female"), (4, "male"), (5, "female"), (8, "male"), (9, "female"), (10, "male")]
    assert expand(schedule, 10) == unmerged(A1111_DOCTESTS[-1][1], 10)


def test_text_at_step_follows_a1111_zero_based_lookup():
    schedule = prompt_schedule("[cat:dog:10]", 20)
    # A1111 counts denoiser calls from 0 and takes the first entry with end >= count
    assert [text_at_step(schedule, i) for i in range(20)] == ["cat"] * 11 + ["dog"] * 9
    assert text_at_step(schedule, 25) == "cat"  # past the end: A1111 falls back to the first
    alternating = prompt_schedule("[a|b]", 4)
    assert [text_at_step(alternating, i) for i in range(4)] == ["a", "a", "b", "a"]


def test_hostile_prompts_neither_crash_nor_hang():
    start = time.monotonic()
    for prompt in ["(" * 3000 + "[a:b:3]" + ")" * 3000, "[" * 20000, "(a:b:c" * 3000 + "[x:2]",
                   "[a|" * 5000, "\\" * 1001, "[" * 500 + "a" + "]" * 500]:
        schedule = prompt_schedule(prompt, 20)
        assert schedule and schedule[-1][0] == 20
    assert prompt_schedule("(a:b:c" * 3000 + "[x:2]", 20)[0] == (2, "(a:b:c" * 3000)
    assert time.monotonic() - start < 20


def test_schedule_then_attention_pipeline():
    schedule = prompt_schedule("a ([cat:dog:0.5]:1.3), [blurry]", 10)
    assert [(end, parse_attention(text)) for end, text in schedule] == [
        (5, [("a ", 1.0), ("cat", 1.3), (", ", 1.0), ("blurry", 1 / 1.1)]),
        (10, [("a ", 1.0), ("dog", 1.3), (", ", 1.0), ("blurry", 1 / 1.1)]),
    ]


# --------------------------------------------------------------------------------------
# AND
# --------------------------------------------------------------------------------------

AND_CASES = [
    ("a cat", [("a cat", 1.0)]),
    ("a AND b", [("a", 1.0), (" b", 1.0)]),
    ("a:0.5 AND b:2", [("a", 0.5), (" b", 2.0)]),
    ("a AND b : 1.5 ", [("a", 1.0), (" b", 1.5)]),
    ("cat:1.2", [("cat", 1.2)]),  # A1111 reads a trailing :w on any positive prompt
    ("cat:.5", [("cat", 0.5)]),
    ("cat:-1", [("cat", -1.0)]),
    ("(cat:1.2)", [("(cat:1.2)", 1.0)]),
    ("ANDROID and ANDY", [("ANDROID and ANDY", 1.0)]),
    ("a AND", [("a", 1.0), ("", 1.0)]),
    ("x\nAND\ny", [("x", 1.0), ("\ny", 1.0)]),
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize("prompt,expected", AND_CASES, ids=[c[0] or "<empty>" for c in AND_CASES])
def test_split_and(prompt, expected):
    assert split_and(prompt) == expected


# --------------------------------------------------------------------------------------
# Extra networks
# --------------------------------------------------------------------------------------


def test_extract_extra_networks_removes_tags_and_keeps_the_rest():
    text, nets = extract_extra_networks("a, <lora:add_detail:0.8>, b <hypernet:h:0.6><lyco:ly:1:0.5>")
    assert text == "a, , b "
    assert [(n.kind, n.name, n.args) for n in nets] == [
        ("lora", "add_detail", ["0.8"]), ("hypernet", "h", ["0.6"]), ("lyco", "ly", ["1", "0.5"])]
    assert nets[0].text == "<lora:add_detail:0.8>"


@pytest.mark.parametrize("prompt,kept", [
    ("<foo:bar>", ""),  # any kind is removed; unknown ones are reported by the caller
    ("a <lora:> b", "a <lora:> b"),  # needs something after the colon
    ("a <lora x:1> b", "a <lora x:1> b"),  # kind is one \w+ word
    ("a <b> c", "a <b> c"),
    ("(<lora:x:1>:1.2)", "(:1.2)"),
    ("<lora:x:1>\n<lora:y:1>", "\n"),
])
def test_extract_extra_networks_text(prompt, kept):
    assert extract_extra_networks(prompt)[0] == kept


LORA_CASES = [
    ("<lora:x>", 1.0, 1.0, None),
    ("<lora:x:0.5>", 0.5, 0.5, None),  # one weight: both
    ("<lora:x:0.5:1>", 0.5, 1.0, None),  # text encoder first, then U-Net (A1111's order)
    ("<lora:x:1:0.5:16>", 1.0, 0.5, 16),
    ("<lora:x:te=0.5:unet=1>", 0.5, 1.0, None),
    ("<lora:x:unet=1:te=0.5>", 0.5, 1.0, None),
    ("<lora:x:te=0.3>", 0.3, 0.3, None),  # the U-Net follows the text encoder
    ("<lora:x:unet=0.2>", 1.0, 0.2, None),
    ("<lora:x:0.8:unet=0.2>", 0.8, 0.2, None),
    ("<lora:x:0.8:te=0.1>", 0.1, 0.1, None),  # named wins over positional
    ("<lora:x:1:0.5:dyn=8>", 1.0, 0.5, 8),
    ("<lora:x:-0.5>", -0.5, -0.5, None),
    ("<lyco:x:0.7>", 0.7, 0.7, None),
    ("<lora:my lora v1.5:0.8>", 0.8, 0.8, None),
]


@pytest.mark.parametrize("tag,te,unet,dyn", LORA_CASES, ids=[c[0] for c in LORA_CASES])
def test_lora_weights(tag, te, unet, dyn):
    (net,) = extract_extra_networks(tag)[1]
    assert net.is_lora
    assert net.lora_weights() == (te, unet)
    assert net.te_multiplier() == te and net.unet_multiplier() == unet
    assert net.dyn_dim() == dyn
    assert net.multiplier() == te


def test_lora_name_and_named_args():
    (net,) = extract_extra_networks("<lora:my lora v1.5:0.8:unet=0.2>")[1]
    assert net.name == "my lora v1.5"
    assert net.positional == ["0.8"] and net.named == {"unet": "0.2"}
    # the name is the first item without "=" (A1111's positional[0])
    (net,) = extract_extra_networks("<lora:te=0.5:x:0.9>")[1]
    assert (net.name, net.lora_weights()) == ("x", (0.5, 0.5))
    (net,) = extract_extra_networks("<lora:te=0.5>")[1]
    assert net.name == ""


def test_hypernet_and_other_kinds():
    (h, o) = extract_extra_networks("<hypernet:h:0.6><hypernet:g>")[1]
    assert not h.is_lora and h.multiplier() == 0.6 and o.multiplier() == 1.0


def test_bad_weights_raise_value_error_naming_the_tag():
    (net,) = extract_extra_networks("<lora:x:abc>")[1]
    with pytest.raises(ValueError, match="<lora:x:abc>"):
        net.lora_weights()
    (net,) = extract_extra_networks("<lora:x:1:1:big>")[1]
    with pytest.raises(ValueError, match="dyn"):
        net.dyn_dim()


def test_extra_network_is_a_plain_value():
    assert extract_extra_networks("<lora:x:1>")[1] == [ExtraNetwork("lora", "x", ["1"], "<lora:x:1>")]


def test_no_torch_import():
    code = ("import sys, pipelines.core.prompt_parser, pipelines.core.styles; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
