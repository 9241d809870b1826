"""The engine as its users run it: one generation (``generate``), the JSON-lines protocol
(``serve``) and the provenance written into every PNG (``provenance``)."""
