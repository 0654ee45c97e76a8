/** The bundled Java example: says where it runs, then exits 0. */
public class Hello {
    public static void main(String[] args) {
        Runtime rt = Runtime.getRuntime();
        System.out.printf("Hello from fuse! Java %s on %s %s (%s), %d CPU, max heap %d MB%n",
                System.getProperty("java.version"),
                System.getProperty("os.name"),
                System.getProperty("os.version"),
                System.getProperty("os.arch"),
                rt.availableProcessors(),
                rt.maxMemory() / (1024 * 1024));
        for (String arg : args) {
            System.out.println("arg: " + arg);
        }
    }
}
