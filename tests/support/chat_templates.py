"""Chat templates that attack the renderer, and a GGUF carrying one."""

from __future__ import annotations

import struct

# Each pair of ranges is within the sandbox's cap (100,000 items), together 10**10 iterations.
NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
SANDBOX_ESCAPE = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
FLOOD = "{% for i in range(100000) %}{{ 'flood' * 1000 }}{% endfor %}"
NOT_JINJA = "{% if %}"

KEY = b"tokenizer.chat_template"


def gguf_with_template(src: str, dst: str, template: str) -> str:
    """A copy of the GGUF ``src`` whose tokenizer.chat_template is ``template``, padded with spaces
    to the old template's length so that no offset in the file moves."""
    data = bytearray(open(src, "rb").read())
    at = data.index(struct.pack("<Q", len(KEY)) + KEY) + 8 + len(KEY) + 4  # key, then its type (STRING)
    length = struct.unpack_from("<Q", data, at)[0]
    new = template.encode()
    assert len(new) <= length, (len(new), length)
    data[at + 8:at + 8 + length] = new + b" " * (length - len(new))
    open(dst, "wb").write(bytes(data))
    return dst
