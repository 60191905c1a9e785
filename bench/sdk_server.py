"""The peer: the official MCP Python SDK (`mcp` 2.3.0) serving the same `echo` tool, under uvicorn.

`MCPServer` (formerly FastMCP) in stateless JSON mode, its fastest configuration: every POST is
answered with one JSON body, no session is kept. uvicorn runs it on uvloop + httptools, the same
event loop and HTTP parser as mcpherd, without access logging, in one process.

- 2026-07-28 requests take the SDK's modern path (`handle_modern_request`).
- Handshake-era requests (`MCP-Protocol-Version: 2025-11-25`) take its stateless legacy path, which
  serves `tools/call` without an `initialize` first; that is the cheapest 2025-11-25 path the SDK has.

    python bench/sdk_server.py --port 8002 [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse

import uvicorn
from mcp.server.mcpserver import MCPServer

server: MCPServer = MCPServer("sdk-bench", version="1.0.0")


@server.tool()
async def echo(text: str) -> str:
    """Returns the text unchanged."""
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = server.streamable_http_app(json_response=True, stateless_http=True, host=args.host)
    uvicorn.run(app, host=args.host, port=args.port, loop="uvloop", http="httptools",
                log_level="warning", access_log=False, workers=1)


if __name__ == "__main__":
    main()
