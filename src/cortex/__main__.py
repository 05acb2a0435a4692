from cortex.cli.main import main

raise SystemExit(main())
