from . import main

main(prog_name="selfextend-local")
