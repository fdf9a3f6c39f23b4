from vexport.cli import app

app(prog_name="vexport")
