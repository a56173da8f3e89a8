"""Train / calibration / held-out text from the running interpreter's standard library sources.

Every machine with Python has these files and nothing in the repo copies them: the repo stores only the
module lists below. All modules exist as pure-Python source in CPython 3.10-3.13 (modules removed in 3.13
and ones that became thin re-export shims are left out). The exact text, and so every token count and
perplexity, depends on the CPython version; reports name it. Some distributions split modules out of the
interpreter package (Debian/Ubuntu: tkinter, idlelib); set QUANTKIT_STDLIB to another CPython's Lib/ folder
(e.g. a pyenv build's lib/python3.X) to read the text from there.
"""

from __future__ import annotations

import os
import platform
import sysconfig
from pathlib import Path

from quantkit.errors import QuantkitError

HELDOUT = (
    "argparse", "difflib", "fractions", "gettext", "imaplib", "ipaddress", "shlex", "statistics", "textwrap",
    "uuid", "email._header_value_parser", "http.cookiejar", "xml.dom.minidom", "unittest.mock",
)
CALIBRATION = (
    "configparser", "csv", "heapq", "pprint", "queue", "smtplib", "json.decoder", "json.encoder",
    "logging.handlers", "urllib.parse",
)
TRAIN = (
    "ast", "calendar", "dataclasses", "enum", "ftplib", "functools", "glob", "gzip", "inspect", "locale",
    "mailbox", "mimetypes", "optparse", "pdb", "pickle", "pickletools", "platform", "plistlib", "poplib",
    "pydoc", "random", "shutil", "socket", "socketserver", "string", "subprocess", "tarfile", "tempfile",
    "threading", "tokenize", "trace", "traceback", "typing", "warnings", "weakref", "zipfile", "_pydecimal",
    "_pyio", "doctest", "bdb", "cmd", "code", "codecs", "contextlib", "copy", "dis", "fileinput", "fnmatch",
    "getopt", "hmac", "linecache", "numbers", "operator", "os", "posixpath", "ntpath", "pstats", "profile",
    "pyclbr", "quopri", "reprlib", "runpy", "sched", "secrets", "selectors", "email.message",
    "email.feedparser", "email.utils", "http.client", "http.server", "http.cookies", "logging",
    "logging.config", "urllib.request", "xml.etree.ElementTree", "unittest.case", "asyncio.base_events",
    "asyncio.tasks", "asyncio.streams", "concurrent.futures._base", "concurrent.futures.process",
    "collections", "multiprocessing.connection", "multiprocessing.managers", "multiprocessing.pool",
    "importlib._bootstrap", "importlib._bootstrap_external", "wsgiref.handlers", "xmlrpc.client",
    "xmlrpc.server", "bisect", "base64", "compileall", "contextvars", "filecmp", "graphlib", "keyword",
    "modulefinder", "netrc", "nturl2path", "opcode", "pkgutil", "py_compile", "rlcompleter", "stat",
    "stringprep", "symtable", "tabnanny", "timeit", "tracemalloc", "types", "wave", "webbrowser", "zipapp",
    "asyncio.events", "asyncio.futures", "asyncio.locks", "asyncio.queues", "asyncio.selector_events",
    "asyncio.sslproto", "asyncio.subprocess", "asyncio.unix_events", "asyncio.windows_events",
    "asyncio.proactor_events", "asyncio.transports", "_collections_abc", "concurrent.futures.thread", "ctypes",
    "ctypes.util", "dbm.dumb", "email.charset", "email.header", "email.headerregistry", "email.contentmanager",
    "email.generator", "email.policy", "email._policybase", "email.parser", "email.base64mime",
    "email.quoprimime", "html.parser", "importlib.metadata", "importlib.util", "json.scanner",
    "multiprocessing.context", "multiprocessing.process", "multiprocessing.queues", "multiprocessing.synchronize",
    "multiprocessing.shared_memory", "multiprocessing.util", "multiprocessing.reduction", "multiprocessing.spawn",
    "multiprocessing.resource_tracker", "multiprocessing.heap", "multiprocessing.forkserver", "sqlite3.dump",
    "unittest.loader", "unittest.main", "unittest.result", "unittest.runner", "unittest.suite", "unittest.util",
    "unittest.async_case", "urllib.error", "urllib.robotparser", "wsgiref.simple_server", "wsgiref.util",
    "wsgiref.validate", "xml.dom.pulldom", "xml.dom.expatbuilder", "xml.dom.xmlbuilder", "xml.etree.ElementPath",
    "xml.sax.saxutils", "xml.sax.handler", "xml.sax.expatreader", "xml.sax.xmlreader", "zoneinfo._zoneinfo",
    "zoneinfo._tzpath", "_py_abc", "_compat_pickle", "_markupbase", "_osx_support", "_strptime",
    "_threading_local", "_weakrefset", "bz2", "cProfile", "colorsys", "copyreg", "genericpath", "getpass",
    "hashlib", "lzma", "pty", "shelve", "signal", "site", "ssl", "sysconfig", "turtle", "zipimport", "tkinter",
    "tkinter.ttk", "tkinter.filedialog", "idlelib.editor", "idlelib.pyshell", "idlelib.configdialog",
    "idlelib.config", "venv", "ensurepip", "curses.textpad", "encodings.idna", "encodings.punycode", "re",
)
SPLITS = {"train": TRAIN, "calibration": CALIBRATION, "heldout": HELDOUT}


def stdlib_dir() -> Path:
    return Path(os.environ.get("QUANTKIT_STDLIB") or sysconfig.get_paths()["stdlib"])


def module_source(module: str) -> str:
    # Looked up as files under the stdlib directory, not through imports: 3.11+ freezes some (os, codecs).
    base = stdlib_dir() / module.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path.read_text(encoding="utf-8")
    raise QuantkitError(f"standard-library module {module!r} has no Python source in {stdlib_dir()} "
                        f"(Python {python_version()}); the text sets need CPython 3.10-3.13's Lib/ sources: install "
                        "the distribution's package for the module (e.g. python3-tk) or set QUANTKIT_STDLIB to "
                        "a complete CPython Lib/ folder")


def documents(split: str) -> list[str]:
    """The split's documents: one module source each, in the fixed order above."""
    try:
        modules = SPLITS[split]
    except KeyError:
        raise QuantkitError(f"unknown text set {split!r}; choose one of {', '.join(SPLITS)}") from None
    return [module_source(m) for m in modules]


def text(split: str) -> str:
    """The split as one string, documents separated by a blank line."""
    return "\n\n".join(documents(split))


def python_version() -> str:
    if os.environ.get("QUANTKIT_STDLIB"):
        return f"stdlib at {os.environ['QUANTKIT_STDLIB']}"
    return platform.python_version()
