from qtalign.cli import main

raise SystemExit(main())
