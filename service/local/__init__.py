"""Local tooling, not part of a deployed role: real Kafka and Redis servers for tests, CI and the
local stack (``infra``), the whole stack on one machine (``up``: ``ctp up``), and the README's
settings table (``settings_doc``)."""
