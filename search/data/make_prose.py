"""Re-make kjv.txt.gz: continuous King James prose from Debian's bible-kjv-text package.

Usage (on a Debian/Ubuntu machine):

    apt-get download bible-kjv-text            # or use /var/cache/apt/archives/bible-kjv-text_4.38_all.deb
    python search/data/make_prose.py bible-kjv-text_4.38_all.deb search/data/kjv.txt.gz

The package ships /usr/lib/bible.data in the "EC02" format of Chip Chapin's Bible Retrieval
System: a 0x5c-byte header, a table of big-endian uint32 offsets, then 64 KiB blocks each
compressed with Unix `compress` (LZW, 16 bits); only the first block keeps the 3-byte `.Z` magic.
`gzip -d` reads `.Z` streams, so each block is decompressed by prefixing that magic again.

The decompressed text has one verse per line ("Ge1:1 In the beginning ..."). We drop the verse
references, join the verses of a chapter into one paragraph (one line), separate books by a blank
line, and keep the prose books (law, histories, major prophets, Jonah, gospels, Acts): long runs of
prose make a natural haystack, and the selection (~3.1 MB, ~0.89 MB compressed) holds 20 disjoint
windows of 32K tokens.
"""
from __future__ import annotations

import gzip
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

# Prose books in canonical order, by the abbreviations bible.data uses: the law and the histories
# (Genesis to Esther), the major prophets without Lamentations (a poem), Jonah, the gospels and Acts.
# Enough text for 20 disjoint 32K-token windows (about 757,000 SmolLM2 tokens).
BOOKS = ("Ge", "Exo", "Lev", "Num", "Deu", "Josh", "Jdgs", "Ruth", "1Sm", "2Sm", "1Ki", "2Ki", "1Chr", "2Chr",
         "Ezra", "Neh", "Est", "Isa", "Jer", "Eze", "Dan", "Jonah",
         "Mat", "Mark", "Luke", "John", "Acts")

VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")
HEADER_END = 0x5C        # the offset table starts here
Z_MAGIC = b"\x1f\x9d\x90"  # compress(1) magic + flags byte (block mode, 16-bit codes)


def extract_bible_data(deb: Path) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        return (Path(tmp) / "usr/lib/bible.data").read_bytes()


def decompress(data: bytes) -> str:
    if not data.startswith(b"EC02"):
        raise ValueError("bible.data: not an EC02 compressed data file")
    first = struct.unpack(">I", data[HEADER_END:HEADER_END + 4])[0]
    # The offset table runs until the first block, which begins with the .Z magic.
    n = (first - len(Z_MAGIC) - HEADER_END) // 4
    offsets = struct.unpack(f">{n}I", data[HEADER_END:HEADER_END + 4 * n])
    if offsets[-1] != len(data):
        raise ValueError("bible.data: offset table does not end at the end of the file")
    blocks = []
    for start, end in zip(offsets, offsets[1:]):
        out = subprocess.run(["gzip", "-dc"], input=Z_MAGIC + data[start:end],
                             capture_output=True, check=True)
        blocks.append(out.stdout)
    return b"".join(blocks).decode("ascii")


def to_prose(text: str, books: tuple[str, ...] = BOOKS) -> str:
    chapters: dict[tuple[str, str], list[str]] = {}
    for line in text.splitlines()[1:]:          # line 0 is a title banner
        m = VERSE.match(line)
        if m is None:
            if line.strip():
                raise ValueError(f"unexpected line: {line!r}")
            continue
        book, chapter, _verse, words = m.groups()
        if book in books:
            chapters.setdefault((book, chapter), []).append(" ".join(words.split()))
    out: list[str] = []
    for book in books:
        paras = [" ".join(v) for (b, _c), v in chapters.items() if b == book]
        if not paras:
            raise ValueError(f"book {book!r} not found")
        out.append("\n".join(paras))
    return "\n\n".join(out) + "\n"


def main(argv: list[str]) -> None:
    deb, dest = Path(argv[1]), Path(argv[2])
    prose = to_prose(decompress(extract_bible_data(deb)))
    assert not re.search(r"\d", prose), "verse numbers left in the prose"
    # mtime=0: the same input gives a byte-identical .gz
    with open(dest, "wb") as raw, gzip.GzipFile(filename="kjv.txt", mode="wb", fileobj=raw,
                                                 compresslevel=9, mtime=0) as f:
        f.write(prose.encode("ascii"))
    print(f"{dest}: {len(prose):,} characters, {dest.stat().st_size:,} bytes compressed")


if __name__ == "__main__":
    main(sys.argv)
