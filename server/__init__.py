"""The OpenAI-compatible HTTP server (``jaxpaged serve``, ``python -m jaxpaged.server``).

``app.build_app(engine, settings)`` gives the Starlette app; ``launch.run_server(args)`` runs it
under uvicorn. Kept import-free so that the CLI can read the arguments (``args``) cheaply.
"""
