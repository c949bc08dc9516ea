"""ctp service: ingest, replay memory, trainer worker, registry and API around the ctp library."""
