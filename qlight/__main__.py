from qlight.cli import main

main()
