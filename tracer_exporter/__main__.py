from tracer_exporter.cli import main

raise SystemExit(main())
