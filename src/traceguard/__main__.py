from traceguard.cli import main

raise SystemExit(main())
