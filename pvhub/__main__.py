from pvhub.cli import main

raise SystemExit(main())
