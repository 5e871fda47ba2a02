from t3d.cli import main

raise SystemExit(main())
