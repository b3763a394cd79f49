"""A local ChouetteCopro: the assumed contract, in memory, with rate limits and fault injection.

Every request under ``/api/v1`` goes through the same steps: injected faults, Basic auth, the
key's rate limit (and a record of any request sent before the Retry-After it was given), then
validation against ``schemas/chouettecopro.openapi.yaml`` with openapi-core (multipart bodies
included), and only then the handler. Scripted answers (``script``) replace the answer to the next
requests of a method: a refusal, a malformed answer after the work was done, a connection that
hangs, an error that echoes the credentials. ``/_sandbox/*`` controls faults and shows the state;
the same is available from Python for tests. Run it alone with
``python -m consumer.local.sandbox --port 8081 --accounts-file accounts.json``.
The package's modules: ``server`` (the pipeline and controls), ``handlers`` (the contract's
operations), ``contract`` (the OpenAPI check), ``jsonapi`` (answers), ``accounts``, ``ratelimit``,
``faults``, ``scripted`` and ``storage``.
"""

from consumer.local.sandbox.accounts import DEMO_API_KEY, Account, RateLimit, load_accounts
from consumer.local.sandbox.contract import SCHEMA_PATH
from consumer.local.sandbox.faults import Faults
from consumer.local.sandbox.jsonapi import JSON_API
from consumer.local.sandbox.scripted import Answer, Scripted
from consumer.local.sandbox.server import SandboxServer
from consumer.local.sandbox.storage import SandboxDocument

__all__ = [
    "DEMO_API_KEY",
    "JSON_API",
    "SCHEMA_PATH",
    "Account",
    "Answer",
    "Faults",
    "RateLimit",
    "SandboxDocument",
    "SandboxServer",
    "Scripted",
    "load_accounts",
]
