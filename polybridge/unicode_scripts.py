"""Unicode scripts that registry entries may name, with the code-point ranges that define them.

Registry entries list the scripts their language is written in (``scripts: [Han]``); the router
uses the same table for its first, rule-based detection stage. Names follow the Unicode
``Script`` property (ISO 15924 long names). Only the blocks that matter for prompts are listed.
"""

from __future__ import annotations

SCRIPT_RANGES: dict[str, tuple[tuple[int, int], ...]] = {
    "Latin": ((0x0041, 0x005A), (0x0061, 0x007A), (0x00C0, 0x024F), (0x1E00, 0x1EFF), (0xFF21, 0xFF3A),
              (0xFF41, 0xFF5A)),  # the last two: fullwidth Latin letters, as CJK text writes them
    "Han": ((0x3005, 0x3007), (0x3021, 0x3029), (0x3038, 0x303B),  # 々 〆 〇, Hangzhou numerals: Script=Han
            (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2FA1F)),
    "Hiragana": ((0x3040, 0x309F),),
    "Katakana": ((0x30A0, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F)),
    "Hangul": ((0x1100, 0x11FF), (0x3130, 0x318F), (0xAC00, 0xD7AF)),
    "Cyrillic": ((0x0400, 0x04FF), (0x0500, 0x052F)),
    "Arabic": ((0x0600, 0x06FF), (0x0750, 0x077F), (0x08A0, 0x08FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF)),
    "Devanagari": ((0x0900, 0x097F), (0xA8E0, 0xA8FF)),
    "Thai": ((0x0E00, 0x0E7F),),
    "Greek": ((0x0370, 0x03FF),),
    "Hebrew": ((0x0590, 0x05FF),),
    "Bengali": ((0x0980, 0x09FF),),
    "Tamil": ((0x0B80, 0x0BFF),),
    "Georgian": ((0x10A0, 0x10FF),),
    "Armenian": ((0x0530, 0x058F),),
}

KNOWN_SCRIPTS: tuple[str, ...] = tuple(SCRIPT_RANGES)


def script_of(char: str) -> str | None:
    """The script of one character, or None for digits, punctuation, emoji and unlisted scripts."""
    cp = ord(char)
    for name, ranges in SCRIPT_RANGES.items():
        for lo, hi in ranges:
            if lo <= cp <= hi:
                return name
    return None
