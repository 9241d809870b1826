"""The engine as the add-on sees it (standard library only, never bpy): ``engine_client`` speaks
the line protocol to one engine process; ``engine_session`` keeps the add-on's warm one, sets up
the engine's Python and runs the health check."""
