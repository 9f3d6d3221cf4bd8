"""A1111's prompt language, text side only: no torch, no model (the UI imports this).

Written from A1111's documented and observed behaviour, not from its code. Where A1111
crashes on an input, this module does something harmless instead; each such place says so.

Order in which A1111 applies the pieces to a positive prompt (the encoder should do the same):

1. styles (``pipelines.core.styles``);
2. ``extract_extra_networks`` (``pipelines.core.extra_networks``): every
   ``<word:...>`` tag is cut out of the text;
3. ``split_and``: composable-diffusion sub-prompts ``a AND b:0.5`` (positive prompt only);
4. ``prompt_schedule`` on each sub-prompt: ``[from:to:when]``, ``[a|b]`` → text per step;
5. ``parse_attention`` on each scheduled text: ``(x:1.2)``, ``[x]``, ``BREAK``.

The negative prompt goes through 1, 4 and 5 only: A1111 neither removes ``<lora:...>`` tags
from it (they are encoded as plain words) nor splits it at ``AND``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------
# Emphasis: (x) (x:1.5) [x] and BREAK
# ---------------------------------------------------------------------------------------

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

BREAK: tuple[str, float] = ("BREAK", -1.0)
"""The segment ``parse_attention`` yields for a ``BREAK`` keyword: start a new 75-token chunk."""

_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")
# ":" + number + ")" closes a round bracket with an explicit weight; spaces allowed around
# the number. The number is A1111's loose [+-]?[.\d]+, so "1.2.3" can match and is then
# rejected by float() below.
_WEIGHT_CLOSE = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_SPECIAL = "\\()[]:"


def is_break(segment: tuple[str, float]) -> bool:
    """True for the chunk-break marker (A1111 tests text == "BREAK" and weight == -1)."""
    return segment[0] == "BREAK" and segment[1] == -1


def _attention_tokens(text: str):
    """Yield (kind, value) pairs: 'text', 'open(', 'open[', 'close)', 'close]', 'weight'."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            nxt = text[i + 1] if i + 1 < n else ""
            if nxt and nxt in "()[]\\":
                yield "escaped", nxt
                i += 2
            else:
                # A1111 drops a backslash that escapes nothing: "a\b" reads "ab"
                yield "escaped", ""
                i += 1
        elif c == "(":
            yield "open(", c
            i += 1
        elif c == "[":
            yield "open[", c
            i += 1
        elif c == ")":
            yield "close)", c
            i += 1
        elif c == "]":
            yield "close]", c
            i += 1
        elif c == ":":
            m = _WEIGHT_CLOSE.match(text, i)
            weight = None
            if m:
                try:
                    weight = float(m.group(1))
                except ValueError:  # "(a:1.2.3)" or "(a:.)": A1111 raises; we read ':' as text
                    weight = None
            if weight is not None:
                yield "weight", (weight, m.group(0))
                i = m.end()
            else:
                yield "text", ":"
                i += 1
        else:
            j = i + 1
            while j < n and text[j] not in _SPECIAL:
                j += 1
            yield "text", text[i:j]
            i = j


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs, exactly as A1111's emphasis parser does.

    - ``(x)`` multiplies by 1.1, ``[x]`` by 1/1.1, ``(x:w)`` by ``w``; nesting multiplies
      (``((x))`` is 1.1*1.1 computed in that order, so weights compare equal to A1111's).
    - ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` give the literal character; a backslash before
      anything else is dropped.
    - An unclosed ``(`` or ``[`` applies to the rest of the prompt (round brackets first,
      then square, each in opening order); a ``)`` or ``]`` with nothing open to close, or
      ``(x:w)``-style weight with no ``(`` open, is literal text. Round and square brackets
      are counted separately, so ``(a [b) c]`` is legal: the ``)`` closes the ``(``.
    - ``BREAK`` (upper case, a whole word) becomes the marker ``("BREAK", -1.0)`` and eats the
      whitespace around it. Like A1111, brackets around it multiply the marker too, so
      ``(BREAK)`` is no break but the word "BREAK" at weight -1.1.
    - Adjacent runs of exactly equal weight are merged; empty text gives ``[("", 1.0)]``.
    """
    res: list[list] = []  # [text, weight]
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for seg in res[start:]:
            seg[1] *= factor

    for kind, value in _attention_tokens(text):
        if kind == "escaped":
            res.append([value, 1.0])
        elif kind == "open(":
            round_open.append(len(res))
        elif kind == "open[":
            square_open.append(len(res))
        elif kind == "weight" and round_open:
            multiply_from(round_open.pop(), value[0])
        elif kind == "close)" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif kind == "close]" and square_open:
            multiply_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            literal = value[1] if kind == "weight" else value
            for k, part in enumerate(_BREAK_WORD.split(literal)):
                if k:
                    res.append(list(BREAK))
                res.append([part, 1.0])

    for start in round_open:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply_from(start, SQUARE_MULTIPLIER)

    if not res:
        return [("", 1.0)]

    merged: list[list] = [res[0]]
    for seg in res[1:]:
        if seg[1] == merged[-1][1]:
            merged[-1][0] += seg[0]
        else:
            merged.append(seg)
    return [(t, w) for t, w in merged]


# ---------------------------------------------------------------------------------------
# Prompt editing and alternation: [from:to:when] [add:when] [remove::when] [a|b|c]
# ---------------------------------------------------------------------------------------
#
# A1111's grammar, restated:
#   top level: any mix of prompt pieces and the literal characters ( ) [ ] :
#   prompt piece: plain text | "(" p ")" | "(" p ":" p ")" | "[" p "]"
#                 | "[" [p ":"] p ":" NUMBER "]" (spaces allowed around NUMBER)
#                 | "[" p ("|" [p])+ "]"
#   plain text: characters other than \ [ ] ( ) : | , or a backslash and any one character
#               except a newline (the pair is kept as written).
# Inside a bracket construct every bracket must belong to a construct; at the top level a
# bracket that starts no valid construct is a literal character. A "|" outside [ ], or a
# backslash at the end or before a newline, makes the whole prompt unparseable, and A1111
# then uses the prompt unchanged for every step (no editing at all). Only the scheduled and
# alternate constructs change text; everything else is reproduced as written, so (x:1.2)
# and [x] pass through untouched for parse_attention.

# lark's SIGNED_NUMBER: INT, INT exp, INT "." [INT] [exp], "." INT [exp]; ASCII digits only
_NUMBER_END = re.compile(
    r"\s*([+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+))\s*\]"
)
_STOPS = "[]():|"


class _NoParse(Exception):
    pass


@dataclass
class _Scheduled:
    before: list | None
    after: list
    number: str
    when: int = 0


@dataclass
class _Alternate:
    options: list[list]


def _plain_end(text: str, i: int) -> int:
    """End of the plain run starting at i (may be i itself); _NoParse on a bad backslash."""
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            if i + 1 >= n or text[i + 1] == "\n":
                raise _NoParse
            i += 2
        elif c in _STOPS:
            break
        else:
            i += 1
    return i


class _ScheduleParser:
    """Recursive descent over one prompt. A construct starting at a given position parses
    the same way wherever it is reached from, so results (and failures) are memoised by
    position: retrying every bracket of a broken prompt at the top level stays linear."""

    def __init__(self, text: str):
        self.text = text
        self.memo: dict[int, tuple[object, int] | None] = {}

    def pieces(self, i: int) -> tuple[list, int]:
        """A prompt inside a construct: stops (without consuming) at ] ) : | or the end."""
        text, out, n = self.text, [], len(self.text)
        while i < n:
            c = text[i]
            if c in "([":
                node, i = self.construct(i)
                out.append(node)
            elif c in "]):|":
                break
            else:
                j = _plain_end(text, i)
                out.append(text[i:j])
                i = j
        return out, i

    def construct(self, i: int) -> tuple[object, int]:
        """The bracket construct at text[i] ('(' or '['); _NoParse if there is none."""
        if i not in self.memo:
            try:
                self.memo[i] = self._construct(i)
            except _NoParse:
                self.memo[i] = None
        result = self.memo[i]
        if result is None:
            raise _NoParse
        return result

    def _construct(self, i: int) -> tuple[object, int]:
        text, n = self.text, len(self.text)
        first, j = self.pieces(i + 1)
        end = text[j] if j < n else ""
        if text[i] == "(":
            if end == ")":
                return ["(", first, ")"], j + 1
            if end == ":":
                second, k = self.pieces(j + 1)
                if k < n and text[k] == ")":
                    return ["(", first, ":", second, ")"], k + 1
            raise _NoParse
        # "["
        if end == "]":
            return ["[", first, "]"], j + 1
        if end == "|":
            options = [first]
            while j < n and text[j] == "|":
                option, j = self.pieces(j + 1)
                options.append(option)
            if j < n and text[j] == "]":
                return _Alternate(options), j + 1
            raise _NoParse
        if end == ":":
            m = _NUMBER_END.match(text, j + 1)
            if m:  # [add:when] / [:when]
                return _Scheduled(None, first, m.group(1)), m.end()
            second, k = self.pieces(j + 1)
            if k < n and text[k] == ":":
                m = _NUMBER_END.match(text, k + 1)
                if m:  # [from:to:when]
                    return _Scheduled(first, second, m.group(1)), m.end()
        raise _NoParse

    def top(self) -> list | None:
        """The whole prompt; None where A1111's parser rejects it."""
        text, out, n, i = self.text, [], len(self.text), 0
        try:
            while i < n:
                c = text[i]
                if c in "([":
                    try:
                        node, i = self.construct(i)
                        out.append(node)
                        continue
                    except _NoParse:
                        pass  # a bracket that starts nothing is a literal character here
                    out.append(c)
                    i += 1
                elif c in "]):":
                    out.append(c)
                    i += 1
                elif c == "|":
                    return None
                else:
                    j = _plain_end(text, i)
                    out.append(text[i:j])
                    i = j
        except _NoParse:
            return None
        return out


def _walk(node):
    if isinstance(node, list):
        for child in node:
            yield from _walk(child)
    elif isinstance(node, _Scheduled):
        yield node
        if node.before is not None:
            yield from _walk(node.before)
        yield from _walk(node.after)
    elif isinstance(node, _Alternate):
        yield node
        for option in node.options:
            yield from _walk(option)


def _when(number: str, steps: int, use_old_scheduling: bool) -> int:
    v = float(number)
    if use_old_scheduling:  # A1111 < 1.6 ("Use old prompt editing timelines"): < 1 is a fraction
        if v < 1:
            v *= steps
    elif "." in number:  # A1111 >= 1.6: a decimal point makes it a fraction of the steps
        v *= steps
    if math.isinf(v):  # A1111 raises on int(inf) ("1e999"); clamp instead
        return steps if v > 0 else -1
    return min(steps, int(v))  # int() truncates toward zero, as A1111


def _render(node, step: int, out: list[str]) -> None:
    if isinstance(node, str):
        out.append(node)
    elif isinstance(node, list):
        for child in node:
            _render(child, step, out)
    elif isinstance(node, _Scheduled):
        if step <= node.when:
            if node.before is not None:
                _render(node.before, step, out)
        else:
            _render(node.after, step, out)
    else:  # _Alternate
        _render(node.options[(step - 1) % len(node.options)], step, out)


def prompt_schedule(prompt: str, steps: int, *, use_old_scheduling: bool = False) -> list[tuple[int, str]]:
    """The texts a prompt asks for over a run of ``steps`` steps: ``[(end_step, text), ...]``.

    Each entry holds from the previous entry's end (exclusive) to its own ``end_step``
    (inclusive); the last one ends at ``steps``. Consecutive equal texts are merged, so the
    encoder encodes once per entry. ``text_at_step`` picks the entry A1111 uses at a step.

    - ``[from:to:when]`` is ``from`` for steps <= when, then ``to``; ``[add:when]`` is
      ``[:add:when]``; ``[remove::when]``.
    - ``when`` with a decimal point (``0.25``, ``1.0``, ``.5``) is a fraction of ``steps``,
      without one (``10``) a step number (A1111 >= 1.6); then truncated by ``int()`` and
      capped at ``steps``, so ``0.29`` at 100 steps is step 28 (float 28.999...), as A1111.
      ``use_old_scheduling=True`` is A1111's compatibility option: below 1 a fraction, else a
      step number.
    - ``[a|b|c]`` is option ``(step - 1) % n`` at each step 1..steps; an empty option is "".
    - Constructs nest (``[a:[b:c:2]:1]``, ``[x|[y:z:3]]``, ``([a:b:0.5]:1.2)``).
    - Unparseable prompts (a ``|`` outside ``[ ]``, a trailing backslash, …) give
      ``[(steps, prompt)]`` unchanged, as A1111; emphasis syntax passes through as written.
    """
    try:
        return _schedule(prompt, steps, use_old_scheduling)
    except RecursionError:  # hundreds of nested brackets: A1111 fails too; use the text as is
        return [(steps, prompt)]


def _schedule(prompt: str, steps: int, use_old_scheduling: bool) -> list[tuple[int, str]]:
    tree = _ScheduleParser(prompt).top()
    if tree is None:
        return [(steps, prompt)]

    ends = {steps}
    for node in _walk(tree):
        if isinstance(node, _Scheduled):
            node.when = _when(node.number, steps, use_old_scheduling)
            if node.when >= 1:
                ends.add(node.when)
        else:
            ends.update(range(1, steps + 1))

    schedule: list[tuple[int, str]] = []
    for end in sorted(ends):
        parts: list[str] = []
        _render(tree, end, parts)
        text = "".join(parts)
        if schedule and schedule[-1][1] == text:
            schedule[-1] = (end, text)
        else:
            schedule.append((end, text))
    return schedule


def text_at_step(schedule: list[tuple[int, str]], step_index: int) -> str:
    """The text A1111 conditions on at sampler step ``step_index`` (0-based).

    A1111 counts denoiser calls from 0 and takes the first entry whose end_step >= that count
    (so ``[a:b:10]`` at 20 steps uses ``a`` for calls 0..10, i.e. 11 calls), and the first
    entry when the count runs past the end.
    """
    for end, text in schedule:
        if step_index <= end:
            return text
    return schedule[0][1]


# ---------------------------------------------------------------------------------------
# Composable diffusion: "a AND b:0.5"
# ---------------------------------------------------------------------------------------

_AND = re.compile(r"\bAND\b")
_SUBPROMPT_WEIGHT = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.S)


def split_and(prompt: str) -> list[tuple[str, float]]:
    """A1111's ``AND`` split of a positive prompt: ``[(sub_prompt, weight), ...]``.

    Each part may end in ``:weight`` (default 1.0); trailing whitespace is dropped, leading
    whitespace kept. Note that A1111 does this for every positive prompt, so even a prompt
    without ``AND`` that ends in ``:0.5`` gets weight 0.5 (which scales the CFG guidance of
    that sub-prompt). Encoders that do not support several sub-prompts may encode the parts'
    texts joined, or the first; they must not fail.
    """
    out = []
    for part in _AND.split(prompt):
        m = _SUBPROMPT_WEIGHT.match(part)
        text, weight = m.group(1), m.group(2)
        out.append((text, float(weight) if weight is not None else 1.0))
    return out
