"""nnsight-server: an OpenAI-compatible server for one nnsight-wrapped HuggingFace causal LM.

Import-order guard (keep it first): importing nnsight mounts ``.save`` on every
Python object, and anyio (under Starlette) refuses to define a
``TypedAttributeSet`` subclass that has an unannotated public attribute. anyio
0.4.16 loads its asyncio backend and socket/TLS/file stream classes lazily, on
the first streamed response, which is after nnsight was imported. Defining
them here, before anything imports nnsight, keeps streaming working.
"""

import anyio._backends._asyncio  # noqa: F401
import anyio.abc  # noqa: F401
import anyio.streams.file  # noqa: F401
import anyio.streams.tls  # noqa: F401
