"""mcpherd: run MCP servers at the speed of the whole machine.

    from mcpherd import App, Context

    app = App("weather", version="1.0")

    @app.tool()
    async def forecast(city: str, ctx: Context) -> str: ...
"""

from mcpherd.worker.app import App, ToolAnnotations, mcp_header
from mcpherd.worker.context import ClientError, Context, ToolError

__version__ = "0.1.0"
__all__ = ["App", "ClientError", "Context", "ToolAnnotations", "ToolError", "mcp_header", "__version__"]
