"""Function calling as structured output: a request that must call one named function gets the function's
parameters (a JSON schema) as its grammar, and its reply is returned as a call with those arguments.

This is what instructor's default mode (``TOOLS``), LangChain's ``with_structured_output`` and most
"extract a record" code send: ``tools`` with a named ``tool_choice`` (OpenAI), or one tool (Ollama, which
has no ``tool_choice``). A server that does not pick between functions or between a call and a text
answer says so by name (``tool_choice: "auto"``, several tools on Ollama's API) and points at what works.
The model sees the function too: a system note with its name, description and schema, as a chat
template with tools would show it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from ..engine.errors import Naming, SelfExtendError, cut
from ..engine.grammar import Structure, schema_structure
from .http import APIError

NO_PARAMETERS = {"type": "object", "properties": {}}
WHAT_WORKS = (
    'name the function: "tool_choice": {"type": "function", "function": {"name": "..."}}, '
    'or ask for JSON with "response_format"'
)


@dataclass(frozen=True)
class Tool:
    """One function a reply calls: its name, what it does, and its arguments' JSON schema."""

    name: str
    description: str
    parameters: Mapping

    def structure(self, param: str) -> Structure:
        """The grammar of its arguments; a schema the grammar cannot hold is a 400 naming ``param``."""
        try:
            return schema_structure(self.parameters)
        except SelfExtendError as exc:
            raise APIError.of(exc, Naming({"response_format": param, "grammar": param})) from None

    def note(self) -> str:
        """What the model is told (as a system message): the call it is to write."""
        about = f" ({self.description.strip()})" if self.description.strip() else ""
        schema = json.dumps(self.parameters, ensure_ascii=False)
        return f"Reply with a call to the function {self.name}{about}: its arguments as JSON matching {schema}"


def tools_of(tools: object, param: str = "tools") -> list[Tool]:
    """The functions ``tools`` lists (OpenAI's and Ollama's shape: ``{"type": "function", "function": {...}}``)."""
    if not isinstance(tools, list):
        raise APIError(400, f"{param} must be a list of functions", param=param)
    found = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise APIError(400, f'{param}[{i}] must be {{"type": "function", "function": {{...}}}}', param=param)
        name, parameters = function.get("name"), function.get("parameters", NO_PARAMETERS)
        if not isinstance(name, str) or not name:
            raise APIError(400, f"{param}[{i}].function.name must be a non-empty string", param=param)
        if not isinstance(parameters, dict):
            raise APIError(400, f"{param}[{i}].function.parameters must be a JSON schema (an object)", param=param)
        description = function.get("description") or ""
        found.append(Tool(name, description if isinstance(description, str) else "", parameters))
    return found


def openai_choice(tools: object, choice: object) -> Tool | None:
    """The function an OpenAI request must call: the one ``tool_choice`` names, or the only one with
    ``"required"``; None with ``"none"`` or no tools. ``"auto"`` (the default with tools) is refused."""
    listed = tools_of(tools) if tools else []
    if choice == "none" or (not listed and choice is None):
        return None
    if not listed:
        raise APIError(400, "tool_choice needs tools: the functions it may call", param="tools")
    if choice in (None, "auto"):
        raise APIError(
            400,
            'tool_choice "auto" is not supported: this server does not decide between a call and a text answer; '
            + WHAT_WORKS,
            param="tool_choice",
        )
    if choice == "required":
        if len(listed) > 1:
            raise APIError(
                400,
                'tool_choice "required" with several tools: this server does not pick one; ' + WHAT_WORKS,
                param="tool_choice",
            )
        return listed[0]
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise APIError(400, 'tool_choice must be "none", "required" or {"type": "function", ...}', param="tool_choice")
    for tool in listed:
        if tool.name == name:
            return tool
    raise APIError(400, f"tool_choice names {cut(name)!r}, which is not among tools", param="tool_choice")


def ollama_choice(tools: object) -> Tool | None:
    """The function an Ollama request calls: its one tool (Ollama's API has no tool_choice)."""
    listed = tools_of(tools) if tools else []
    if len(listed) > 1:
        raise APIError(
            400,
            "tools: give one function; this server replies with a call to the one given (structured output) and "
            'does not choose among several, or give "format": a JSON schema',
            param="tools",
        )
    return listed[0] if listed else None


def with_note(messages: list[dict], tool: Tool) -> list[dict]:
    """``messages`` with the function's note in the system message (added first when there is none)."""
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{tool.note()}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": tool.note()}, *messages]


def arguments(text: str) -> dict | None:
    """A finished reply's arguments as an object (Ollama gives them so), or None when it is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
