fn main() -> std::process::ExitCode {
    cms_template::PROGRAM.main()
}
